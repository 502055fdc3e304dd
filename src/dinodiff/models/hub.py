"""Where a diffusers model lives: its own folder or hub repo, or a subfolder of a full Stable Diffusion pipeline."""

from __future__ import annotations

from pathlib import Path


def pipeline_subfolder(model_class: type, path: str, subfolder: str) -> str | None:
    """`subfolder` (e.g. 'unet', 'vae') when ``path`` is a full SD pipeline holding it: a local folder with
    SUBFOLDER/config.json, or a hub repo whose SUBFOLDER config ``model_class.load_config`` finds; else None
    (``path`` is the model itself)."""
    folder = Path(path)
    if folder.is_dir():
        return subfolder if (folder / subfolder / "config.json").is_file() else None
    try:
        model_class.load_config(path, subfolder=subfolder)
        return subfolder
    except (OSError, EnvironmentError):
        return None
