"""Throughput of `dinodiff prepare` vs a plain PIL loop over the same files.

    python benchmarks/bench_prepare.py --workers 1,2 --size 512

Prints a Markdown table: images/s, images/s per core, and the ratio to the PIL loop per core.
The PIL loop (open, convert('L'), resize to size x size, save PNG) is the floor of what any
preprocessing costs; `prepare` additionally removes borders, crops 1:1, uses Lanczos, computes
statistics and writes tar shards.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from PIL import Image

from dinodiff.data.datasets import discover
from dinodiff.prepare import prepare

REPO = Path(__file__).resolve().parents[1]


def pil_loop(files: list[Path], size: int, out: Path) -> tuple[float, int]:
    """Seconds and count for the plain PIL baseline; unreadable files are skipped."""
    t0, n = time.perf_counter(), 0
    for i, f in enumerate(files):
        try:
            with Image.open(f) as im:
                im.convert("L").resize((size, size)).save(out / f"{i:06d}.png")
            n += 1
        except OSError:
            pass
    return time.perf_counter() - t0, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", default=str(REPO.parent / "shared" / "data" / "cxr-covid" / "images"))
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=2, help="best of N runs per setting")
    args = ap.parse_args()
    files = [r.path for r in discover(args.src, kind="folder")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pil_loop(files, args.size, tmp)  # warm the page cache so every method reads from memory
        best = min(pil_loop(files, args.size, tmp)[0] for _ in range(args.repeat))
        pil_rate = len(files) / best
        rows.append(("PIL loop (open, L, resize, PNG)", 1, pil_rate))
        for w in (int(x) for x in args.workers.split(",")):
            times = []
            for r in range(args.repeat):
                t0 = time.perf_counter()
                m = prepare([args.src], tmp / f"p{w}-{r}", size=args.size, shard_size=args.shard_size,
                            workers=w, progress=False)
                times.append(time.perf_counter() - t0)
            rows.append((f"dinodiff prepare ({m['counts']['written']} written)", w, m["counts"]["found"] / min(times)))
    print(f"\n{len(files)} files from {args.src}, size {args.size}, best of {args.repeat}\n")
    print("| method | workers | images/s | images/s per core | per core vs PIL | vs prepare 1 worker |")
    print("|---|---|---|---|---|---|")
    one = next((rate for name, w, rate in rows if w == 1 and name.startswith("dinodiff")), None)
    for name, w, rate in rows:
        vs_one = f"{rate / one:.2f}x" if one and name.startswith("dinodiff") else ""
        print(f"| {name} | {w} | {rate:.1f} | {rate / w:.1f} | {rate / w / pil_rate:.2f}x | {vs_one} |")


if __name__ == "__main__":
    main()
