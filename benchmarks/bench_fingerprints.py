"""Cost and margin of the training-image check (`dinodiff.data.fingerprints`), which `segment` runs before its split:
training images read and fingerprinted per second (what a million-image training set costs), and how far the
evaluation images found lie from the threshold, and the ones not found.

    python benchmarks/bench_fingerprints.py --prepared PREP --data LUNGS-COVID --data LUNGS-SHENZHEN --size 64

PREP is a `dinodiff prepare` folder (the model's training set); --data are lung-mask folders read as `segment`
reads them. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import platform
import time

from dinodiff.data.fingerprints import SAME_IMAGE, fingerprints
from dinodiff.data.image_sets import image_records
from dinodiff.evaluate.segment.data import load_cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepared", required=True)
    parser.add_argument("--split", default=None, help="The training split (default: every split).")
    parser.add_argument("--data", action="append", required=True)
    parser.add_argument("--size", type=int, default=64, help="Side at which the evaluation images are read.")
    args = parser.parse_args()

    start = time.perf_counter()
    records = list(image_records(args.prepared, size=0, kind="shards", split=args.split))
    reference = fingerprints(record.decode() for record in records)
    seconds = time.perf_counter() - start
    cases = [case for folder in args.data for case in load_cases(folder, args.size)]
    best = (fingerprints(case.image for case in cases) @ reference.T).max(1)
    found = best >= SAME_IMAGE
    rate = len(records) / seconds
    print(f"{platform.node()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, one process\n")
    print("| training images | read + fingerprinted in | images/s | 1M images | evaluation images | found "
          "(>= {:.2f}) | lowest found | highest not found |".format(SAME_IMAGE))
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {len(records)} | {seconds:.2f} s | {rate:.0f} | {1e6 / rate / 60:.0f} min | {len(cases)} "
          f"| {int(found.sum())} | {best[found].min() if found.any() else float('nan'):.4f} "
          f"| {best[~found].max() if (~found).any() else float('nan'):.4f} |")


if __name__ == "__main__":
    main()
