"""Rewrite a wheel keeping only the native libraries that match a pattern (for the GPU bundle's 60 MiB limit).

    python benchmarks/gpu/slim_wheel.py IN.whl OUT_DIR --keep 'libbitsandbytes_(cpu|cuda13\\d)\\.so'

bitsandbytes ships one native library per CUDA/ROCm/XPU version (129 MB unpacked, a 41 MiB wheel); it loads the
one matching torch.version.cuda. The device's torch is built for CUDA 13.0, so the bundle keeps the CUDA 13.x
and CPU libraries: every other file is copied unchanged and RECORD is rewritten with the new hashes, so pip
installs the result like the original. The wheel keeps its name and version.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import re
import zipfile
from pathlib import Path


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def slim(wheel: Path, out_dir: Path, keep: str) -> Path:
    """Copy `wheel` into `out_dir` without the `.so` files whose name does not match `keep`."""
    pattern, out = re.compile(keep), out_dir / wheel.name
    out_dir.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        record_name = next(n for n in src.namelist() if n.endswith(".dist-info/RECORD"))
        lines = []
        for name in src.namelist():
            base = name.rsplit("/", 1)[-1]
            if name == record_name or (base.endswith(".so") and not pattern.fullmatch(base)):
                continue
            data = src.read(name)
            dst.writestr(src.getinfo(name), data)
            lines.append(_record_line(name, data))
        dst.writestr(record_name, "\n".join([*lines, f"{record_name},,"]) + "\n")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("wheel", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--keep", required=True, help="regular expression of the .so file names to keep")
    args = parser.parse_args()
    out = slim(args.wheel, args.out_dir, args.keep)
    print(f"{out}: {out.stat().st_size / 2**20:.1f} MiB (was {args.wheel.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
