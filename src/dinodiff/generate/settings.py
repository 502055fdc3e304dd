"""What the generated images depend on: `GenerateSettings`, saved in provenance.json (a rerun must match). A light
module: the CLI makes `dinodiff generate`'s options from its fields at start-up, without torch."""

from __future__ import annotations

from dataclasses import dataclass, field

from dinodiff.config import setting

STRATEGIES = ("reconstruction", "interpolation", "sampled")  # sampled: c_GLB from an embedding model (no source)


@dataclass(frozen=True)
class GenerateSettings:
    """Everything the generated images depend on (saved in provenance.json; a rerun must match)."""

    strategy: str = setting("reconstruction", "reconstruction (variations of each source), interpolation (mixes of "
                                              "label-sharing pairs) or sampled (c_GLB drawn from --embedding-model; "
                                              "sources give only labels).")
    ratio: int = setting(1, "Synthetic images per real source (the paper's 1:1, 1:5, 1:10, 1:50 -> 1, 5, 10, 50).")
    seed: int = setting(0, "Base seed; item i uses a seed derived from (seed, i), recorded in labels.csv.")
    num_inference_steps: int = setting(25, "Sampling steps.", flags=("--steps",))
    guidance_scale: float = setting(1.0, "Classifier-free guidance scale (needs a model trained with "
                                         "train.cond_dropout > 0).", flags=("--guidance",))
    scheduler: str = setting("dpm", "Sampler: dpm (DPM-Solver++), ddim, euler, euler-a, ddpm, unipc, pndm or a "
                                    "diffusers scheduler class.")
    mix: str = setting("lerp", "Interpolation of c_GLB: lerp or slerp.")
    r_range: tuple[float, float] = setting((0.0, 1.0), "Interpolation: r drawn uniformly from LOW,HIGH.")
    r_values: list[float] | None = setting(None, "Interpolation: draw r from this comma list instead of --r-range "
                                                 "(e.g. 0.25,0.5,0.75).")
    shared_label: bool = setting(True, "Interpolate only pairs sharing a positive label (the paper; sources with no "
                                       "label pair with each other), or any pair (see dinodiff.interpolate).",
                                 flags=("--shared-label/--any-pair",))
    source_options: dict = field(default_factory=dict)  # iter_sources options: kind, split, limit, path_column, ...
    embedding_model: str | None = setting(None, "Sampled: an embedding model folder made by `dinodiff "
                                                "train-embeddings`.")
    embedding_guidance: float = setting(1.0, "Sampled: guidance scale on the sources' labels (label-conditioned "
                                             "embedding model).")
    embedding_steps: int = setting(50, "Sampled: DDIM steps of the embedding model.")

    def __post_init__(self) -> None:
        from dinodiff.interpolate import MIXES  # here, not at the top: the CLI imports this module without torch

        if self.strategy not in STRATEGIES:
            raise ValueError(f"Unknown strategy {self.strategy!r}; use one of {STRATEGIES}.")
        if self.mix not in MIXES:
            raise ValueError(f"Unknown interpolation {self.mix!r}; use one of {MIXES}.")
        if self.strategy == "sampled" and not self.embedding_model:
            raise ValueError("--strategy sampled needs --embedding-model DIR (made by `dinodiff train-embeddings`).")
        if self.ratio < 1 or self.num_inference_steps < 1:
            raise ValueError(f"ratio and num_inference_steps must be >= 1, got {self.ratio} and "
                             f"{self.num_inference_steps}.")
