"""`dinodiff demo`: every stage end to end, on built-in phantoms (or a folder of real images), with progress
and a final table of where each result is. A stage whose recorded outputs match its settings is skipped, so a
rerun is quick; an interrupted stage resumes (the stage functions resume their own work)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from dinodiff.demo import stages
from dinodiff.demo.checks import learning_checks
from dinodiff.demo.settings import DemoSettings
from dinodiff.files import write_json_atomic
from dinodiff.results import RESULTS_FILE, read_results

logger = logging.getLogger(__name__)
console = Console()
STATE_DIR = ".demo"


@dataclass
class Stage:
    name: str
    title: str
    fn: Callable[[DemoSettings], dict[str, Path]]
    depends: tuple[str, ...]  # the settings its outputs depend on (with every earlier stage's)
    optional: bool = False  # on real data: skipped with its reason when the data lacks what it needs


@dataclass
class Outcome:
    status: str
    seconds: float
    outputs: dict[str, str] = field(default_factory=dict)


def _checks(s: DemoSettings) -> dict[str, Path]:
    out = s.root / "checks"
    provenance = {"checkpoint": str(stages.model_folder(s)), "encoder": str(s.root / "encoder" / "encoder"),
                  "extractor": "8x8 area-downsampled pixels; CLS token of the demo's encoder",
                  "untrained": "the same UNet and projection re-initialised (step 0), same conditions and seeds",
                  "seeds": [s.seed, s.seed + 1], "data": str(stages.source_folder(s)), "split": "prepared test split"}
    learning_checks(stages.model_folder(s), s.root / "prepared", out, size=s.size, eval_images=s.eval_images,
                    pairs=s.interpolation_pairs, seed=s.seed, steps=s.sample_steps, provenance=provenance,
                    sampler=s.sampler)
    return {"results": out / "results.json", "samples": out / "samples.png"}


_DATA = ("data", "n", "phantom_size", "size", "test_fraction", "seed")
_ENC = _DATA + ("encoder_steps", "encoder_batch")
_TRAIN = _ENC + ("views", "train_steps", "batch_size", "lr", "unet_channels", "prediction", "latent_factor")
_GEN = _TRAIN + ("sampler", "sample_steps")

STAGES = [
    Stage("phantoms", "images: built-in phantoms with lung masks and labels (or --data)", stages.stage_phantoms, _DATA),
    Stage("prepare", "prepare: border removal, square crop, resize, WebDataset shards", stages.stage_prepare, _DATA),
    Stage("encoder", "pretrain-encoder: DINO on the prepared images (cpu-encoder preset, reduced)",
          stages.stage_encoder, _ENC),
    Stage("probe", "probe-encoder: the demo's encoder vs its random init (labels, view retrieval)",
          stages.stage_probe, _ENC, optional=True),
    Stage("cache", "cache: latents + the encoder's c_GLB of augmented views", stages.stage_cache, _TRAIN),
    Stage("train", "train: tiny UNet from the cache (resumes if interrupted)", stages.stage_train, _TRAIN),
    Stage("generate", "generate: reconstructions and interpolations of held-out images", stages.stage_generate,
          _GEN + ("generate_sources",)),
    Stage("checks", "image quality and learning checks: trained vs untrained model", _checks,
          _GEN + ("eval_images", "interpolation_pairs")),
    Stage("classify", "classify: real-only, synthetic arms and their count-matched controls", stages.stage_classify,
          _GEN + ("classify_regimes", "classify_ratios", "classify_folds", "classify_seeds", "classify_epochs"),
          optional=True),
    Stage("segment", "segment: DiffSeg vs prior, Otsu and position-only baselines", stages.stage_segment,
          _TRAIN + ("segment_limit", "segment_timesteps", "segment_grids", "segment_thresholds"), optional=True),
    Stage("report", "report: one HTML page and a Markdown summary", stages.stage_report, ()),
]


def _run_stage(stage: Stage, s: DemoSettings, index: int) -> Outcome:
    marker = s.root / STATE_DIR / f"{stage.name}.json"
    key = s.fingerprint(*stage.depends)
    console.rule(f"[bold]{index}/{len(STAGES)} {stage.title}")
    if stage.name != "report" and marker.is_file():
        record = json.loads(marker.read_text())
        if record.get("fingerprint") == key and all(Path(p).exists() for p in record["outputs"].values()):
            console.print(f"[green]done earlier[/green] ({record['seconds']:.0f} s then): skipped")
            return Outcome("done earlier", 0.0, record["outputs"])
    start = time.time()
    try:
        outputs = {k: str(v) for k, v in stage.fn(s).items()}
    except (ValueError, FileNotFoundError) as err:
        if not (stage.optional and s.data):
            raise
        console.print(f"[yellow]skipped: {err}[/yellow]")
        return Outcome(f"skipped: {err}", time.time() - start)
    seconds = time.time() - start
    write_json_atomic(marker, {"fingerprint": key, "seconds": seconds, "outputs": outputs})
    return Outcome("ran", seconds, outputs)


def _table(outcomes: dict[str, Outcome]) -> Table:
    table = Table(title="dinodiff demo: where each result is")
    for column, justify in (("stage", "left"), ("status", "left"), ("seconds", "right"), ("outputs", "left")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for name, o in outcomes.items():
        table.add_row(name, o.status, f"{o.seconds:.0f}", "\n".join(f"{k}: {v}" for k, v in o.outputs.items()))
    return table


def run_demo(settings: DemoSettings) -> dict[str, Outcome]:
    """Run (or finish) every stage into settings.out; returns each stage's outcome."""
    s = settings
    (s.root / STATE_DIR).mkdir(parents=True, exist_ok=True)
    if s.threads > 0:
        torch.set_num_threads(s.threads)
    write_json_atomic(s.root / STATE_DIR / "settings.json", s.record())
    console.print(f"dinodiff demo into [bold]{s.root}[/bold] on {s.data or 'built-in phantoms'}")
    outcomes: dict[str, Outcome] = {}
    for index, stage in enumerate(STAGES, 1):
        outcomes[stage.name] = _run_stage(stage, s, index)
    console.print(_table(outcomes))
    checks = read_results(s.root / "checks" / RESULTS_FILE)
    for row in checks.tables["learning checks"]:
        mark = "[green]holds[/green]" if row["holds"] else "[red]does not hold[/red]"
        console.print(f"{mark}  {row['check']}: trained {row['trained']}")
    console.print(f"Open [bold]{outcomes['report'].outputs.get('html')}[/bold] in a browser.")
    return outcomes
