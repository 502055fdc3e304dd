"""Does each stage's cost grow linearly in the number of images, with bounded memory? (issue 22)

    python benchmarks/bench_scale.py --sizes 1000,10000,100000 --work /tmp/scale --plot docs/scale-exponents.png

For each size N it writes N phantoms at 32 px (a folder + labels.csv; set-up, not timed), then runs every stage
in its own process: `prepare` (1 worker), `cache` (the `tiny` models, 2 views, 1 loader worker) and the planning
of `generate` (encode the sources into sources/, plan N reconstructions, find this process's chunks, write
labels.csv; sampling itself is per image and left out). Each row is the stage's own wall time and CPU time
(user + system, its DataLoader workers included; imports and interpreter start-up excluded) and the process's
peak RSS. CPU time is what the exponents are fitted on: on a shared machine the wall time follows the other jobs'
load, and even CPU time drifts with it (SMT and cache contention: the same 10k prepare took 10.5 and 15.5 CPU s an
hour apart at load 8-12). So each stage runs its sizes up and back down (1k, 10k, 100k, 10k, 1k): the smaller
sizes bracket the largest in time, and their two runs are averaged. The growth exponent is the log-log slope of time (and of peak RSS) against N: from the last two
sizes, and a least-squares fit over all sizes. Linear time is 1.0; flat memory is ~0.

Rows are kept in `--work`/results.json, so an interrupted run (the 100k point takes a while on 2 cores) goes on
where it stopped; `--force` redoes them.

Hooks: stages owned elsewhere, wired in HOOKS as `Hook(setup, run)`: `setup(data, n)` runs untimed in the stage
process (inputs, cleaning; its memory is in the "RSS after set-up" column), then `run(state)` is timed:
- `audit`: a fixed 1000-image synthetic set (other phantoms) audited against the N prepared training images in
  the pixel copy space and the tiny model's c_glb (1000 train->train calibration queries, held-out capped at 1000);
- `classify-id-filter`: classify's real-image cache of the N prepared images, a fixed 200-image regime drawn from
  its pool, and that subset's source images read back by id (what `generate` does with classify's `ids=`);
- `embedding-metrics`: `embedding_report` of 1000 sampled c_GLB against N training images x 2 views (random
  float32 arrays of sd15-dinov1's c_GLB shape, 2 x 768; the reference is the training set's first views).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

HERE = Path(__file__).resolve()
STAGES = ("prepare", "cache", "generate-plan")
# Stages owned elsewhere are wired below as hooks (HOOKS): set-up untimed, then the stage timed. They read prepare's
# output, made as (untimed) set-up when missing.
# ---------------------------------------------------------------------------------------------- set-up
def write_phantom_folder(folder: Path, n: int, size: int = 32) -> Path:
    """N phantoms as `images/phantom_NNNNNNN.png` + a labels.csv at the root (prepare's folder kind)."""
    from PIL import Image

    from dinodiff.data.phantoms import LABELS, make_phantom

    done = folder.with_name(folder.name + ".json")  # beside the folder: prepare reads every file inside
    if done.is_file() and json.loads(done.read_text()).get("n") == n:
        return folder
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        phantom, path = make_phantom(i, size=size), folder / "images" / f"phantom_{i:07d}.png"
        Image.fromarray(phantom.image).save(path, format="PNG")
        rows.append([f"images/{path.name}", *(phantom.labels[k] for k in LABELS)])
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows([["path", *LABELS], *rows])
    (folder / "labels.csv").write_text(buffer.getvalue())
    done.write_text(json.dumps({"n": n, "size": size}))
    return folder


def tiny_model(work: Path) -> Path:
    """A random model of the `tiny` preset (32 px), saved once as a model folder."""
    folder = work / "tiny-model"
    if not (folder / "model_index.json").is_file():
        from dinodiff.config import load_training_settings
        from dinodiff.models.factory import build_components
        from dinodiff.pipeline import save_model_folder

        cfg = load_training_settings("tiny")
        parts = build_components(cfg.model)
        save_model_folder(folder, unet=parts.unet, projection=parts.projection, autoencoder=parts.autoencoder,
                          noise_scheduler=parts.noise_scheduler, model_cfg=cfg.model, encoder=parts.encoder)
    return folder


# ------------------------------------------------------------------------------------ stages (in a child)
def stage_prepare(data: Path, n: int) -> None:
    from dinodiff.prepare import prepare

    shutil.rmtree(data / "prepared", ignore_errors=True)
    prepare([data / "raw"], data / "prepared", size=32, min_size=16, shard_size=1000, workers=1, test_fraction=0.1,
            progress=False)


VIEWS = int(os.environ.get("BENCH_SCALE_VIEWS", "2"))


def stage_cache(data: Path, n: int) -> None:
    from dinodiff.cache import build_cache
    from dinodiff.config import load_training_settings

    shutil.rmtree(data / "cache", ignore_errors=True)
    cfg = load_training_settings("tiny", [f"data.shards={data / 'prepared'}", f"train.run_dir={data / 'run'}"])
    build_cache(cfg, data / "cache", views=VIEWS, batch_size=256, progress=False, num_workers=1)


def stage_generate_plan(data: Path, n: int) -> None:
    from accelerate import PartialState

    from dinodiff.generate.outputs import start_provenance, write_labels
    from dinodiff.generate import GenerateSettings
    from dinodiff.generate.stage import plan_job
    from dinodiff.pipeline.sample import load_pipeline

    out, model, prepared = data / "generated", tiny_model(data.parent), data / "prepared"
    shutil.rmtree(out, ignore_errors=True)
    settings = GenerateSettings(strategy="reconstruction", ratio=1, source_options={"kind": "shards", "split": "train"})
    pipeline = load_pipeline(model, settings.scheduler, "cpu")
    start_provenance(out, model, pipeline, settings, prepared)
    job = plan_job(out, prepared, pipeline, settings, PartialState(cpu=True), batch_size=64)
    write_labels(out, job.plan, job.sources, job.names, settings.strategy)


@dataclass
class Hook:
    """A stage wired in by its owner: `setup(data, n)` (untimed: inputs, cleaning) returns what `run` is timed on."""

    setup: Callable[[Path, int], Any]
    run: Callable[[Any], None]


def _prepared(data: Path, n: int) -> Path:
    """prepare's output for this size (made now, untimed, when a hook runs without the prepare stage)."""
    if not (data / "prepared" / "manifest.json").is_file():
        stage_prepare(data, n)
    return data / "prepared"


AUDIT_SYNTHETIC = int(os.environ.get("BENCH_SCALE_AUDIT_SYNTHETIC", "1000"))  # fixed: the N-dependent part is train
AUDIT_QUERIES = 1000  # train->train calibration queries (fixed); held-out images capped at the same count


def write_synthetic_set(folder: Path, n: int, size: int = 32) -> Path:
    """N other phantoms (seed 1) laid out as `dinodiff generate` writes them (images/NNN/, labels.csv,
    provenance.json; strategy interpolation, so no reconstruction source is looked up)."""
    from dinodiff.data.phantoms import LABELS, make_phantom
    from dinodiff.data.shards import encode_png

    if (folder / "provenance.json").is_file():
        return folder
    (folder / "images" / "000").mkdir(parents=True, exist_ok=True)
    rows = [["path", "strategy", "source_a", "source_b", "r", "seed", *LABELS]]
    for i in range(n):
        phantom, path = make_phantom(i, size=size, seed=1), f"images/{i // 1000:03d}/{i:07d}.png"
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_bytes(encode_png(phantom.image))
        rows.append([path, "interpolation", "", "", "", i, *(phantom.labels[k] for k in LABELS)])
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    (folder / "labels.csv").write_text(buffer.getvalue())
    (folder / "provenance.json").write_text(json.dumps({"settings": {"strategy": "interpolation", "ratio": 1}}))
    return folder


def audit_setup(data: Path, n: int) -> tuple:
    from dinodiff.evaluate.audit.stage import AuditSettings

    train = _prepared(data, n)
    synthetic = write_synthetic_set(data.parent / f"audit-synthetic-{AUDIT_SYNTHETIC}", AUDIT_SYNTHETIC)
    shutil.rmtree(data / "audit", ignore_errors=True)
    settings = AuditSettings(train=str(train), model=str(tiny_model(data.parent)), size=32, limit=AUDIT_SYNTHETIC,
                             spaces=["pixels", "c_glb"], calibration_queries=AUDIT_QUERIES, device="cpu")
    return synthetic, data / "audit", settings


def audit_run(state: tuple) -> None:
    from dinodiff.evaluate.audit.stage import audit

    synthetic, out, settings = state
    audit([synthetic], out, settings)


CLASSIFY_REGIME = 200  # a fixed subset (50 per stratum: 3 labels + none) drawn from the pool of N


def classify_setup(data: Path, n: int) -> Path:
    import dinodiff.evaluate.classify.images  # noqa: F401 - imports (sklearn, ...) before the clock starts
    import dinodiff.evaluate.classify.subsets  # noqa: F401

    _prepared(data, n)
    shutil.rmtree(data / "classify", ignore_errors=True)
    return data


def classify_run(data: Path) -> None:
    """classify's real-image cache of the N prepared images, a regime's subset drawn from its pool, and the
    synthetic sets' read of that subset's source images by id (what `generate` does with classify's ids=)."""
    from dinodiff.data.image_sets import iter_sources
    from dinodiff.evaluate.classify.images import load_real, source_options
    from dinodiff.evaluate.classify.settings import DataSettings
    from dinodiff.evaluate.classify.subsets import build_subsets, read_subset

    settings, out = DataSettings(source=str(data / "prepared"), balance_none=True), data / "classify"
    real = load_real(settings, 32, out / "cache")
    names = list(real.names)
    paths = build_subsets(out / "subsets", real.ids, real.positive, names, [CLASSIFY_REGIME],
                          np.flatnonzero(real.split == "train"), real.subjects, subset_seed=0, seeds=[0], folds=3,
                          balance_none=True)
    ids = {real.ids[r] for r in read_subset(paths[(CLASSIFY_REGIME, 0)]).rows}
    found = sum(1 for _ in iter_sources(settings.source, size=32, ids=ids, **source_options(settings)))
    (out / "found.json").write_text(json.dumps({"ids": len(ids), "found": found, "cached": len(real.ids)}))


EMBEDDING_SAMPLES = 1000  # sampled embeddings (fixed), against N training images
EMBEDDING_SHAPE = (2, 2, 768)  # K cached views (as `cache` above) x the c_GLB of sd15-dinov1: 2 tokens x 768


def embedding_setup(data: Path, n: int) -> tuple:
    """Random float32 arrays of c_GLB's shape (the metrics' cost depends on shapes, not values): N training
    images x K views, and the samples; patients: 2 images each."""
    import torch

    import dinodiff.embeddings.metrics  # noqa: F401 - imports (scipy.linalg) before the clock starts

    rng = np.random.default_rng(n)
    views = torch.from_numpy(rng.standard_normal((n, EMBEDDING_SHAPE[0], EMBEDDING_SHAPE[1] * EMBEDDING_SHAPE[2]),
                                                 dtype=np.float32))
    sampled = torch.from_numpy(rng.standard_normal((EMBEDDING_SAMPLES, views.shape[2]), dtype=np.float32))
    return sampled, views, np.arange(n) // 2, data / "embedding-metrics.json"


def embedding_run(state: tuple) -> None:
    from dinodiff.embeddings.metrics import embedding_report

    sampled, views, groups, out = state
    out.write_text(json.dumps(embedding_report(sampled, views, None, groups)))


HOOKS: dict[str, Hook] = {
    "audit": Hook(audit_setup, audit_run),  # 1k synthetic images (pixels + c_glb) against the N training images
    "classify-id-filter": Hook(classify_setup, classify_run),  # real cache of N, a 200-image subset read by id
    "embedding-metrics": Hook(embedding_setup, embedding_run),  # 1k sampled c_GLB against N x 2 training views
}
RUNNERS: dict[str, Callable[[Path, int], None]] = {
    "prepare": stage_prepare, "cache": stage_cache, "generate-plan": stage_generate_plan,
}
ALL_STAGES = (*STAGES, *HOOKS)


def child(stage: str, data: Path, n: int, result: Path) -> None:
    """Run one stage in this process and write its time and memory."""
    import dinodiff.cache  # noqa: F401 - imports (torch, diffusers) before the clock starts
    import dinodiff.generate.stage  # noqa: F401
    import dinodiff.prepare  # noqa: F401

    hook = HOOKS.get(stage)
    state = hook.setup(data, n) if hook else None  # untimed
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cpu, start = _cpu_seconds(), time.perf_counter()
    hook.run(state) if hook else RUNNERS[stage](data, n)
    seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result.write_text(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "peak_rss_mb": peak,
                                  "baseline_rss_mb": baseline}))


def _cpu_seconds() -> float:
    """User + system time of this process and of its finished children (DataLoader workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


# ----------------------------------------------------------------------------------------- parent
def run_stage(stage: str, data: Path, n: int) -> dict:
    result = data / f".{stage}.json"
    result.unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(HERE), "--child", stage, "--data", str(data), "--n", str(n), "--result", str(result)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{stage} at N={n} failed:\n{proc.stderr[-3000:]}")
    return {"stage": stage, "n": n, **json.loads(result.read_text())}


def average_runs(rows: list[dict]) -> list[dict]:
    """One row per (stage, N): times averaged over its runs, the highest peak RSS, and the runs' CPU times."""
    out = []
    for key in sorted({(r["stage"], r["n"]) for r in rows}):
        mine = [r for r in rows if (r["stage"], r["n"]) == key]
        out.append({"stage": key[0], "n": key[1], "runs": len(mine),
                    "seconds": sum(r["seconds"] for r in mine) / len(mine),
                    "cpu_seconds": sum(r["cpu_seconds"] for r in mine) / len(mine),
                    "cpu_seconds_runs": [round(r["cpu_seconds"], 2) for r in mine],
                    "peak_rss_mb": max(r["peak_rss_mb"] for r in mine),
                    "baseline_rss_mb": min(r["baseline_rss_mb"] for r in mine),
                    "working_rss_mb": max(r["peak_rss_mb"] - r["baseline_rss_mb"] for r in mine)})
    return out


def slope(xs: list[float], ys: list[float]) -> Optional[float]:
    """Least-squares slope of log(y) on log(x); None with fewer than two sizes."""
    if len(xs) < 2:
        return None
    lx, ly = np.log(np.asarray(xs, float)), np.log(np.maximum(np.asarray(ys, float), 1e-9))
    return float(np.polyfit(lx, ly, 1)[0])


def exponents(rows: list[dict], clock: str = "cpu_seconds") -> dict:
    out = {}
    for stage in sorted({r["stage"] for r in rows}):
        mine = sorted((r for r in rows if r["stage"] == stage), key=lambda r: r["n"])
        ns = [r["n"] for r in mine]
        last = mine[-2:]
        out[stage] = {
            "sizes": ns,
            "clock": clock,
            "time_last_two": slope([r["n"] for r in last], [r[clock] for r in last]),
            "time_fit": slope(ns, [r[clock] for r in mine]),
            "wall_last_two": slope([r["n"] for r in last], [r["seconds"] for r in last]),
            "rss_last_two": slope([r["n"] for r in last], [r["peak_rss_mb"] for r in last]),
            "rss_growth_mb_last_two": round(last[-1]["peak_rss_mb"] - last[0]["peak_rss_mb"], 1) if len(last) == 2
            else None,
            "working_growth_mb_last_two": round(_working(last[-1]) - _working(last[0]), 1) if len(last) == 2
            else None,
        }
    return out


def _working(row: dict) -> float:
    """Peak RSS above the RSS after imports and set-up (a hook's inputs, e.g. the embeddings, are set-up)."""
    return row.get("working_rss_mb", row["peak_rss_mb"] - row["baseline_rss_mb"])


def table(rows: list[dict], fits: dict) -> str:
    lines = ["| stage | N | wall s | CPU s (runs) | CPU us/image | peak RSS MB | RSS after imports (+ set-up) MB |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (ALL_STAGES.index(r["stage"]) if r["stage"] in ALL_STAGES else 99, r["n"])):
        runs = ", ".join(f"{v:.1f}" for v in r.get("cpu_seconds_runs", [r["cpu_seconds"]]))
        lines.append(f"| {r['stage']} | {r['n']} | {r['seconds']:.2f} | {r['cpu_seconds']:.2f} ({runs}) | "
                     f"{1e6 * r['cpu_seconds'] / r['n']:.0f} | {r['peak_rss_mb']:.0f} | {r['baseline_rss_mb']:.0f} |")
    lines += ["", "| stage | sizes | CPU-time exponent (last two) | CPU-time exponent (fit) | wall exponent (last two) "
              "| RSS exponent (last two) | RSS growth MB (last two) | peak above set-up: growth MB (last two) |",
              "|---|---|---|---|---|---|---|---|"]
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    for stage, f in fits.items():
        lines.append(f"| {stage} | {', '.join(map(str, f['sizes']))} | {fmt(f['time_last_two'])} | "
                     f"{fmt(f['time_fit'])} | {fmt(f['wall_last_two'])} | {fmt(f['rss_last_two'])} | "
                     f"{f['rss_growth_mb_last_two']} | {f['working_growth_mb_last_two']} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for stage in sorted({r["stage"] for r in rows}):
        mine = sorted((r for r in rows if r["stage"] == stage), key=lambda r: r["n"])
        ns = [r["n"] for r in mine]
        axes[0].loglog(ns, [r["cpu_seconds"] for r in mine], "o-", label=stage)
        axes[1].semilogx(ns, [_working(r) for r in mine], "o-", label=stage)
    ns = sorted({r["n"] for r in rows})
    if ns:
        first = min(r["cpu_seconds"] for r in rows if r["n"] == ns[0])
        axes[0].loglog(ns, [first * n / ns[0] for n in ns], "k--", alpha=0.4, label="slope 1 (linear)")
    axes[0].set(xlabel="images N", ylabel="stage CPU time (s)", title="time: log-log")
    axes[1].set(xlabel="images N", ylabel="peak RSS above imports + set-up (MB)",
                title="memory (a hook's inputs, e.g. the embeddings, are set-up)", ylim=(0, None))
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--stages", default=",".join(ALL_STAGES))
    parser.add_argument("--work", default="/tmp/dinodiff-scale")
    parser.add_argument("--plot", default=None, help="PNG of time and memory against N")
    parser.add_argument("--force", action="store_true", help="redo rows already in WORK/results.json")
    parser.add_argument("--once", action="store_true", help="each size once (no way back down): faster, noisier")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, Path(args.data), args.n, Path(args.result))
        return {}
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    saved = work / "results.json"
    rows = [] if args.force or not saved.is_file() else json.loads(saved.read_text())["rows"]
    sizes = sorted(int(s) for s in args.sizes.split(","))
    for n in sizes:
        write_phantom_folder(work / f"n{n}" / "raw", n)
    # prepare before cache and generate-plan (they read its output), each stage up the sizes and back down
    for stage in args.stages.split(","):
        for run, n in enumerate(sizes + ([] if args.once else sizes[-2::-1])):
            attempt = 1 if run < len(sizes) else 2
            if any(r["stage"] == stage and r["n"] == n and r.get("run", 1) == attempt for r in rows):
                continue
            rows.append({**run_stage(stage, work / f"n{n}", n), "run": attempt})
            print(f"{stage} N={n} (run {attempt}): {rows[-1]['seconds']:.2f} s, {rows[-1]['cpu_seconds']:.2f} CPU s, "
                  f"peak RSS {rows[-1]['peak_rss_mb']:.0f} MB", flush=True)
            saved.write_text(json.dumps({"rows": rows}, indent=1))
    rows_now = average_runs([r for r in rows if r["n"] in sizes and r["stage"] in args.stages.split(",")])
    fits = exponents(rows_now)
    report = {"rows": rows_now, "exponents": fits, "load": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                                  time.gmtime())}
    (work / "report.json").write_text(json.dumps(report, indent=1))
    print(table(rows_now, fits))
    if args.plot:
        plot(rows_now, Path(args.plot))
    return report


if __name__ == "__main__":
    main()
