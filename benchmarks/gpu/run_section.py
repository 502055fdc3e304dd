"""Run one section of the GPU evidence (issue 16) in its own process and write its JSON result:

    python benchmarks/gpu/run_section.py train_throughput --json OUT.json [--dry-run] [--budget-s 90]

The sections live in sections.py (sd15 training, sampling, DiffSeg), trainsteps.py (the real Trainer, generate's
precision), realdata.py (a model trained on the bundled real CXRs) and segrecipe.py (issue 23's segmentation
recipe); this entry point is the only module that
knows them all, so none of them imports another's registry.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import traceback
from pathlib import Path

import torch
from sections import SECTIONS, save_partial

logger = logging.getLogger("gpu-evidence")


def run_section(name: str, func, args: argparse.Namespace) -> dict:
    """Run one section; any error becomes status=failed with its traceback tail, so the next section still runs."""
    start = time.time()
    try:
        result = {"status": "ok", **func(args)}
    except Exception as err:  # noqa: BLE001 - the evidence run must record, not stop
        logger.exception("section %s failed", name)
        result = {"status": "failed", "error": f"{type(err).__name__}: {err}"[:2000],
                  "traceback": traceback.format_exc()[-3000:]}
    result["wall_s"] = round(time.time() - start, 1)
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("section")
    parser.add_argument("--json", required=True, help="where to write the section's result")
    parser.add_argument("--bundle", default=".gpu")
    parser.add_argument("--work", required=True)
    parser.add_argument("--out", default=None, help="$OUT (figures and the model tar of the real-data section)")
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--budget-s", type=float, default=90)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--return-model", action="store_true",
                        help="segment_recipe: return its model as seg-model-fp16.tar (when real_data does not run)")
    args = parser.parse_args(argv)
    args.save_partial = lambda payload: save_partial(args, payload)
    args.device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    if args.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    return args


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.section == "real_data":
        from realdata import real_data  # benchmarks/gpu/realdata.py, beside this file

        func = real_data
    elif args.section == "segment_recipe":
        from segrecipe import segment_recipe  # benchmarks/gpu/segrecipe.py: imported only when asked (it trains)

        func = segment_recipe
    elif args.section in ("trainer_steps", "generate_precision"):
        from trainsteps import SECTIONS as TRAINER_SECTIONS  # imported only when asked: it loads the Trainer

        func = TRAINER_SECTIONS[args.section]
    else:
        func = SECTIONS[args.section]
    Path(args.work).mkdir(parents=True, exist_ok=True)
    result = run_section(args.section, func, args)
    Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    logger.info("section %s: %s in %.1f s", args.section, result["status"], result["wall_s"])


if __name__ == "__main__":
    main()
