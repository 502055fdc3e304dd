"""Generation throughput: images/s of DiNODiffusionPipeline per scheduler and step count.

    python benchmarks/bench_generate.py                                  # CPU: tiny and small presets
    python benchmarks/bench_generate.py --cases sd15 --batch-size 16 --precision bf16   # the paper's model (GPU)

Each (case, sampler) row times whole pipeline calls on c_GLB of random source images: encoder, sampling loop
and decoder, i.e. what `dinodiff generate` spends per image. Models are randomly initialised at the real
architectures (speed does not depend on the weights); `sd15` uses SD v1's UNet and AutoencoderKL with a
ViT-B/16 encoder, as in the paper, at 512 px.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

# name -> (preset, resolution, frozen models, default batch)
CASES = {
    "tiny": ("tiny", 32, "preset", 16),
    "small": ("cpu-small", 64, "preset", 16),
    "sd15": ("sd15-dinov1", 512, "paper", 8),
}
DEFAULT_SAMPLERS = "dpm:20,dpm:25,ddim:50,ddpm:1000"


def _paper_frozen_models(folder: Path) -> tuple[str, str]:
    """Random SD-VAE and ViT-B/16 folders, made by bench_train.py's helper (one definition of them)."""
    spec = importlib.util.spec_from_file_location("bench_train", Path(__file__).with_name("bench_train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.paper_frozen_models(folder)


def build_pipeline(case: str, workdir: Path, device: str):
    from dinodiff.config import load_training_settings
    from dinodiff.models.factory import build_components
    from dinodiff.pipeline import DiNODiffusionPipeline

    preset, resolution, frozen, _ = CASES[case]
    overrides = [f"model.resolution={resolution}"]
    if frozen == "paper":
        vae, vit = _paper_frozen_models(workdir)
        overrides += [f"model.encoder.name_or_path={vit}", "model.encoder.tokens=[cls,pooler]",
                      "model.autoencoder.kind=kl", f"model.autoencoder.path={vae}",
                      "model.autoencoder.scaling_factor=0.18215"]
    torch.manual_seed(0)
    parts = build_components(load_training_settings(preset, overrides).model)
    pipe = DiNODiffusionPipeline.from_components(parts).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def time_sampler(pipe, sampler: str, steps: int, batch: int, repeat: int, precision: str) -> dict:
    from dinodiff.sampling import inference_scheduler

    pipe.scheduler = inference_scheduler(pipe.scheduler, sampler)
    cuda = pipe.device.type == "cuda"
    sources = torch.rand(batch, 1, pipe.resolution, pipe.resolution, generator=torch.Generator().manual_seed(0))
    c_glb = pipe.encode_images(sources)

    def call(n_steps: int) -> None:
        gens = [torch.Generator().manual_seed(i) for i in range(batch)]
        pipe(c_glb=c_glb, num_inference_steps=n_steps, generator=gens, output_type="pt")

    call(2)  # warm-up: kernels, allocator
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start, cpu_start = time.time(), time.process_time()
    for _ in range(repeat):
        call(steps)
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.time() - start) / repeat
    # CPU seconds (all threads) per image: steadier than wall time when other jobs share the machine
    cpu_per_image = (time.process_time() - cpu_start) / (repeat * batch)
    return {"sampler": type(pipe.scheduler).__name__, "steps": steps, "batch": batch, "precision": precision,
            "s_per_batch": seconds, "images_per_s": batch / seconds, "unet_evals_per_s": batch * steps / seconds,
            "cpu_s_per_image": cpu_per_image, "threads": torch.get_num_threads(),
            "peak_mem_GB": torch.cuda.max_memory_allocated() / 1e9 if cuda else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="tiny,small", help=f"comma list of {', '.join(CASES)}")
    parser.add_argument("--samplers", default=DEFAULT_SAMPLERS,
                        help="comma list of name:steps (names: see dinodiff.sampling.SCHEDULERS)")
    parser.add_argument("--batch-size", type=int, default=0, help="override the case's batch")
    parser.add_argument("--repeat", type=int, default=2, help="timed calls per row (after one warm-up call)")
    parser.add_argument("--max-steps-cpu", type=int, default=1000, help="skip rows with more steps than this on CPU")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"], help="UNet weights dtype")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--json-out", default=None, help="also write the rows as JSON here")
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-generate-"))
    rows = []
    for case in args.cases.split(","):
        pipe = build_pipeline(case, workdir, args.device)
        if args.precision != "fp32":  # the UNet is where the time goes; VAE and encoder stay fp32
            pipe.unet.to({"bf16": torch.bfloat16, "fp16": torch.float16}[args.precision])
        batch = args.batch_size or CASES[case][3]
        params = sum(p.numel() for p in pipe.unet.parameters()) / 1e6
        for spec in args.samplers.split(","):
            sampler, steps = spec.split(":")
            if pipe.device.type == "cpu" and int(steps) > args.max_steps_cpu:
                continue
            row = {"case": case, "device": torch.cuda.get_device_name() if pipe.device.type == "cuda" else "cpu",
                   "resolution": pipe.resolution, "unet_params_M": params,
                   **time_sampler(pipe, sampler, int(steps), batch, args.repeat, args.precision)}
            rows.append(row)
            print(f"  {case} {sampler}:{steps}: {row['images_per_s']:.2f} images/s", file=sys.stderr, flush=True)
    print("\n| case | device | threads | precision | UNet M params | res | batch | sampler | steps | s/batch "
          "| images/s | UNet evals/s | CPU s/image |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['device']} | {r['threads']} | {r['precision']} | {r['unet_params_M']:.1f} | "
              f"{r['resolution']} | {r['batch']} | {r['sampler']} | {r['steps']} | {r['s_per_batch']:.2f} | "
              f"{r['images_per_s']:.2f} | {r['unet_evals_per_s']:.1f} | {r['cpu_s_per_image']:.3f} |")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
