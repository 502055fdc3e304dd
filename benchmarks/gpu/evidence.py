"""GPU evidence of issue 16 in one run: every section in its own process with a hard time limit.

    python benchmarks/gpu/evidence.py --out $OUT [--bundle .gpu] [--dry-run] [--budget-s 520]

Sections: (a) train_throughput, (e) trainer_steps (issue 22: the real Trainer), (b) sampling, (c) diffseg,
(g) segment_recipe (issue 23; on the GPU only when named in --sections), (d) real_data (gets the time the others
leave), (f) generate_precision (issue 22: fp32 vs bf16 on (d)'s model). The last section named in --sections
also gets the time the others leave (--sections segment_recipe gives that section the whole budget); the dry
run runs every section. A section that fails or overruns is recorded as such in results.json and the next one
runs.
$OUT receives at most 8 flat files: results.json, summary.md, evidence.log (written by evidence.sh),
training.png, evaluation.png and the fp16 model folder as model-fp16.tar (or up to 3 parts).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dinodiff.files import write_json_atomic

HERE = Path(__file__).resolve().parent
MAX_FILES = 8
# (name, seconds on the GPU, seconds in the CPU dry run); real_data, and the last section run, take what is left.
PLAN = [("train_throughput", 75, 90), ("trainer_steps", 150, 150), ("sampling", 40, 90), ("diffseg", 35, 90),
        ("segment_recipe", 170, 150), ("real_data", None, 240), ("generate_precision", 30, 90)]
# Run on the GPU only when named (the default sections fill the budget); the dry run runs them too.
OPT_IN = ("segment_recipe",)
SECTION_STARTUP_S = 12  # python + torch + diffusers import, CUDA context


def run_section(name: str, budget: float, args: argparse.Namespace, work: Path, return_model: bool = False) -> dict:
    out_json = work / f"{name}.json"
    cmd = [sys.executable, str(HERE / "run_section.py"), name, "--json", str(out_json), "--bundle", args.bundle,
           "--work", str(work / name), "--out", args.out, "--budget-s", str(max(budget - SECTION_STARTUP_S, 10))]
    if args.dry_run:
        cmd.append("--dry-run")
    if return_model:
        cmd.append("--return-model")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "DINODIFF_CACHE": str(work / "dinodiff-cache")}
    if args.dry_run:  # a shared, busy CPU: one thread per process avoids oversubscription
        env.setdefault("OMP_NUM_THREADS", "1")
    start = time.time()
    print(f"=== section {name}: budget {budget:.0f} s", flush=True)
    try:
        proc = subprocess.run(cmd, env=env, timeout=budget + 10)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        code = "timeout"
    wall = round(time.time() - start, 1)
    if out_json.is_file():
        result = json.loads(out_json.read_text())
        if result.get("status") == "partial":
            result["status"] = f"stopped ({code}): partial"
            result.setdefault("error", f"section process ended with {code} after {wall} s; rows so far kept")
    else:
        result = {"status": "failed", "error": f"section process ended with {code} after {wall} s and wrote no result"}
    result["process_wall_s"] = wall
    print(f"=== section {name}: {result['status']} in {wall} s", flush=True)
    return result


def _fmt(value, pct: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:.1f}%" if pct else f"{value}"


def summary_md(results: dict) -> str:
    """A short Markdown page of every section's figures (results.json has everything)."""
    meta = results["meta"]
    lines = ["# GPU evidence (issue 16)\n", f"device: {meta.get('device')}; torch {meta.get('torch')}; "
             f"date {meta.get('date')}; dry run: {meta.get('dry_run')}; wall {meta.get('wall_s')} s\n"]
    a = results["sections"].get("train_throughput", {})
    lines.append(f"## (a) training throughput: {a.get('status')}\n")
    if a.get("rows"):
        lines.append(f"UNet {a.get('unet')} ({a.get('unet_params_M')}M params), {a.get('image_px')} px, latents "
                     f"{a.get('latents')}, c_GLB {a.get('c_glb')}; {a.get('precision')}; fwd+bwd "
                     f"{a.get('flops_per_image_fwd_bwd', 0) / 1e12:.3f} TFLOP/image; peak {a.get('peak_tflops')} "
                     f"TFLOP/s ({a.get('peak_source')}); measured bf16 matmul {a.get('matmul_bf16_tflops_measured')}\n")
        lines.append("| grad ckpt | batch | images/s | s/step | peak GiB | TFLOP/s | MFU |\n|---|---|---|---|---|---|---|")
        for r in a["rows"]:
            lines.append(f"| {r['gradient_checkpointing']} | {r['batch']} | {_fmt(r.get('images_per_s'))} | "
                         f"{_fmt(r.get('s_per_step'))} | {_fmt(r.get('peak_mem_GiB'))} | "
                         f"{_fmt(r.get('model_tflops_per_s'))} | {_fmt(r.get('mfu'), True)} {r.get('status', '')} |")
    b = results["sections"].get("sampling", {})
    lines.append(f"\n## (b) sampling: {b.get('status')}\n")
    for r in b.get("rows", []):
        lines.append(f"- {r['scheduler']} {r['steps']} steps ({r['unet_calls']} UNet calls), batch {r['batch']}: "
                     f"{r['images_per_s']} images/s ({b.get('dtype')}, {b.get('includes')})")
    c = results["sections"].get("diffseg", {})
    lines.append(f"\n## (c) DiffSeg: {c.get('status')}\n")
    if "s_per_image" in c:
        lines.append(f"{c['s_per_image']} s/image at {c['image_px']} px ({c['images']} images, batch {c['batch']}, "
                     f"{c['dtype']}, {c['cell']})")
    e = results["sections"].get("segment_recipe", {})
    lines.append(f"\n## (g) segmentation recipe (issue 23): {e.get('status')}\n")
    if e.get("train"):
        lines.append("```\n" + json.dumps({k: e.get(k) for k in ("preset", "encoder", "cache", "train", "model_tar")},
                                           indent=1)
                     + "\n```")
    if e.get("segment"):
        lines.append(e["segment"].get("training_images", ""))
        lines.append(e["segment"].get("table_md", ""))
    d = results["sections"].get("real_data", {})
    lines.append(f"\n## (d) real-data training: {d.get('status')}\n")
    lines.append("```\n" + json.dumps({k: d.get(k) for k in ("cache", "train", "model_tar")}, indent=1) + "\n```")
    ev = d.get("eval", {})
    if ev.get("reconstruction"):
        lines.append("```\n" + json.dumps(ev["reconstruction"], indent=1) + "\n```")
    if ev.get("segment"):
        lines.append(ev["segment"].get("table_md", ""))
    lines += trainer_summary(results["sections"])
    for name, sec in results["sections"].items():
        if sec.get("status") != "ok":
            lines.append(f"\n**{name} failed**: {sec.get('error')}")
    return "\n".join(lines) + "\n"


def trainer_summary(sections: dict) -> list[str]:
    """(e) and (f) of issue 22 in Markdown."""
    e, lines = sections.get("trainer_steps", {}), []
    lines.append(f"\n## (e) Trainer steps (issue 22): {e.get('status')}\n")
    if e.get("rows"):
        lines.append("| kind | batch | grad ckpt | SDPA | optimizer | images/s | s/step | peak GiB | MFU |\n"
                     "|---|---|---|---|---|---|---|---|---|")
        for r in e["rows"]:
            lines.append(f"| {r.get('kind', 'trainer')}{' + compile' if r.get('compile') else ''} | {r.get('batch')} | "
                         f"{r.get('gradient_checkpointing', '')} | {r.get('sdpa_backend', '')} | {r.get('optimizer', '')} | "
                         f"{_fmt(r.get('images_per_s'))} | {_fmt(r.get('s_per_step'))} | {_fmt(r.get('peak_mem_GiB'))} | "
                         f"{_fmt(r.get('mfu'), True)} {r.get('status', '')} |")
        lines.append("\nrecommended: " + json.dumps(e.get("recommended")))
    f = sections.get("generate_precision", {})
    lines.append(f"\n## (f) generation fp32 vs bf16 (issue 22): {f.get('status')}\n")
    if f.get("rows"):
        lines.append("```\n" + json.dumps({"rows": f["rows"], "bf16_vs_fp32": f.get("bf16_vs_fp32")}, indent=1)
                     + "\n```")
    return lines


def write_outputs(out: Path, results: dict) -> None:
    write_json_atomic(out / "results.json", results)
    tmp = out / "summary.md.tmp"
    tmp.write_text(summary_md(results))
    tmp.replace(out / "summary.md")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--bundle", default=".gpu")
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--budget-s", type=float, default=500, help="total seconds for all sections")
    parser.add_argument("--sections", default=None, help="comma list (default: every section; on the GPU those "
                        f"not opt-in: {', '.join(OPT_IN)} runs only when named)")
    parser.add_argument("--work", default=None)
    args = parser.parse_args()
    import torch

    start, out = time.time(), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu-evidence-"))
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "dry_run": args.dry_run,
            "torch": torch.__version__, "python": sys.version.split()[0], "budget_s": args.budget_s,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() and not args.dry_run else "cpu"}
    results = {"meta": meta, "sections": {}}
    wanted = args.sections.split(",") if args.sections else [p[0] for p in PLAN
                                                             if args.dry_run or p[0] not in OPT_IN]
    last = [name for name, _, _ in PLAN if name in wanted][-1:]
    for name, gpu_s, dry_s in PLAN:
        if name not in wanted:
            continue
        left = args.budget_s - (time.time() - start)
        later = sum(p[1] or 0 for p in PLAN[PLAN.index((name, gpu_s, dry_s)) + 1:] if p[0] in wanted)
        rest = gpu_s is None or [name] == last
        budget = dry_s if args.dry_run else (left - 15 - later if rest else gpu_s)
        budget = min(budget, left - 15)
        if budget < 15:
            results["sections"][name] = {"status": "skipped", "error": f"only {left:.0f} s of the budget left"}
            continue
        # (g) returns its model only when (d) does not run: (d)'s figures and model parts fill the 8 files
        return_model = name == "segment_recipe" and "real_data" not in wanted
        results["sections"][name] = run_section(name, budget, args, work, return_model)
        meta["wall_s"] = round(time.time() - start, 1)
        write_outputs(out, results)
    meta["wall_s"] = round(time.time() - start, 1)
    files = sorted(p.name for p in out.iterdir() if p.is_file())
    meta["out_files"] = files + ([] if "evidence.log" in files else ["evidence.log"])
    write_outputs(out, results)
    print(f"wrote {len(meta['out_files'])} files to {out}: {', '.join(meta['out_files'])}", flush=True)
    if len(meta["out_files"]) > MAX_FILES:
        print(f"error: more than {MAX_FILES} files in {out}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
