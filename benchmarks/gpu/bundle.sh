#!/usr/bin/env bash
# make gpu-bundle: fill .gpu/ with what the GPU machine needs and lacks (see benchmarks/gpu/README.md).
#   .gpu/wheels/   cp312 / py3-none-any wheels of the packages the device image does not have (bitsandbytes slimmed)
#   .gpu/data/cxr-covid/        the 300 real CXRs, `dinodiff prepare`d at 256 px (10% test split)
#   .gpu/data/lungs-covid/      lung sets with masks, shrunk to 256 px in the layout `dinodiff segment` reads
#   .gpu/data/lungs-shenzhen/
#   .gpu/weights/taef2/         the TAEF2 tiny autoencoder
#   .gpu/data/cxr-covid-labelled/  the same CXRs at 128 px with a 0/1 `covid` label (for encoder_evidence.sh)
#   .gpu/weights/encoder/       with BUNDLE_ENCODER=RUN/encoder: a `pretrain-encoder` output (the segmentation
#                               recipe's domain encoder; without it that section uses a random ViT)
# Environment: PYTHON (the python that runs dinodiff here, default .venv/bin/python), SHARED_DATA
# (default ../shared/data), GPU_BUNDLE (default .gpu), BUNDLE_LIMIT (only the first N images of each set,
# for tests), BUNDLE_WHEELS=0 (skip the wheels), BUNDLE_MAX_MIB (default 60).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-.venv/bin/python}
SHARED=${SHARED_DATA:-${DINODIFF_TEST_DATA:-../shared/data}}
OUT=${GPU_BUNDLE:-.gpu}
LIMIT=${BUNDLE_LIMIT:-}
MAX_MIB=${BUNDLE_MAX_MIB:-60}
[ -d "$SHARED/cxr-covid" ] || { echo "error: $SHARED/cxr-covid not found; set SHARED_DATA=/path/to/shared/data" >&2; exit 2; }
mkdir -p "$OUT/wheels" "$OUT/data" "$OUT/weights"

if [ "${BUNDLE_WHEELS:-1}" != 0 ]; then
  # Missing on the device (torch 2.11, transformers 5.17, huggingface_hub 1.33 are there): diffusers
  # (needs huggingface_hub>=1.32,<3: 1.33 fits), its importlib_metadata (+ lazy-importer), webdataset
  # (+ braceexpand) and omegaconf (2.4 needs only PyYAML, no antlr4). pydicom (DICOM only) and
  # torchxrayvision (XRV-FID, no weights offline) are imported lazily and not needed by the script.
  pins=""
  # lightly (pretrain-encoder's DINOLoss/head) is py3-none-any; the modules the stage imports need only torch,
  # torchvision, numpy, timm, tqdm, PIL, which the device has (its hydra-core/pytorch-lightning are not imported).
  for name in diffusers webdataset omegaconf braceexpand importlib_metadata lazy-importer lightly; do
    pin=$(grep -i -E "^${name//-/[-_]}==" constraints.txt || true)
    pins="$pins ${pin:-$name}"
  done
  "$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$OUT/wheels" $pins
  # bitsandbytes (the paper's 8-bit AdamW) is a 41 MiB wheel of native libraries for every CUDA/ROCm version; the
  # device's torch is built for CUDA 13.0, so only the CUDA 13.x and CPU libraries travel (6.8 MiB; slim_wheel.py).
  pin=$(grep -i -E "^bitsandbytes==" constraints.txt || echo bitsandbytes)
  rm -rf "$OUT/.bnb"
  "$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$OUT/.bnb" "$pin"
  "$PYTHON" benchmarks/gpu/slim_wheel.py "$OUT"/.bnb/bitsandbytes-*.whl "$OUT/wheels" \
    --keep 'libbitsandbytes_(cpu|cuda13[0-9])\.so'
  rm -rf "$OUT/.bnb"
fi

src_cxr="$SHARED/cxr-covid/images"
if [ -n "$LIMIT" ]; then  # a small subset for tests: links to the first N images
  src_cxr="$OUT/.cxr-subset"; mkdir -p "$src_cxr"
  # sed, not head: head exits early and `sort` dies of SIGPIPE, which pipefail turns into a failure (exit 141)
  ls "$SHARED/cxr-covid/images" | sort | sed -n "1,${LIMIT}p" | while read -r f; do
    ln -sf "$(realpath "$SHARED/cxr-covid/images/$f")" "$src_cxr/$f"; done
fi
# The lung sets are evaluation images: the training CXRs keep none of them (prepare --exclude: 40 of the 300 files
# are the same pictures), so segment's report split can use every lung image.
if [ ! -f "$OUT/data/cxr-covid/manifest.json" ]; then
  "$PYTHON" -m dinodiff.cli prepare "$src_cxr" --out "$OUT/data/cxr-covid" --size 256 --shard-size 100 \
    --test-fraction 0.1 --workers 2 --no-progress --exclude "$SHARED/lungs-covid,$SHARED/lungs-shenzhen"
fi
if [ ! -f "$OUT/data/cxr-covid-labelled/manifest.json" ]; then
  # The CXRs with a 0/1 `covid` column (finding contains "COVID-19"), for `probe-encoder --labels covid`:
  # prepare has no root option for a CSV, so the CSV gets absolute paths.
  mkdir -p "$OUT/.cxrl"
  "$PYTHON" - "$SHARED/cxr-covid/metadata.csv" "$src_cxr" "$OUT/.cxrl/metadata.csv" <<'PY'
import csv, os, sys
src, images, out = sys.argv[1:]
have = set(os.listdir(images))
with open(src, newline="") as f:
    rows = [r for r in csv.DictReader(f) if r["filename"] in have]
with open(out, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["filename", "covid"])
    for r in rows:
        w.writerow([os.path.abspath(os.path.join(images, r["filename"])), int("COVID-19" in r["finding"])])
print(f"cxr-covid-labelled: {len(rows)} images, {sum('COVID-19' in r['finding'] for r in rows)} covid")
PY
  "$PYTHON" -m dinodiff.cli prepare "$OUT/.cxrl/metadata.csv" --out "$OUT/data/cxr-covid-labelled" --size 128 \
    --shard-size 100 --workers 2 --no-progress
  rm -rf "$OUT/.cxrl"
fi
for set in lungs-covid lungs-shenzhen; do
  [ -d "$OUT/data/$set/CXR_png" ] || "$PYTHON" benchmarks/gpu/shrink_lungs.py "$SHARED/$set" "$OUT/data/$set" --size 256 ${LIMIT:+--limit $LIMIT}
done
mkdir -p "$OUT/weights/taef2"
cp "$SHARED"/weights/taef2/* "$OUT/weights/taef2/"
if [ -n "${BUNDLE_ENCODER:-}" ]; then
  rm -rf "$OUT/weights/encoder" "$OUT/data/encoder-train"; cp -r "$BUNDLE_ENCODER" "$OUT/weights/encoder"
  # The encoder's training images travel too (its training_images.json names their prepared folder), re-pointed to
  # the bundle's copy, so segment on the device can check the lung sets against them.
  "$PYTHON" - "$OUT" <<'PY'
import json, shutil, sys
from pathlib import Path
bundle = Path(sys.argv[1])
record_path = bundle / "weights/encoder/training_images.json"
if record_path.is_file():
    record = json.loads(record_path.read_text())
    shutil.copytree(record["shards"], bundle / "data/encoder-train", ignore=shutil.ignore_patterns("*.log"))
    record["bundled_from"], record["shards"] = record["shards"], str(bundle / "data/encoder-train")
    record_path.write_text(json.dumps(record, indent=1))
    print(f"encoder training images: {record['count']} from {record['bundled_from']} -> {record['shards']}")
PY
fi
rm -rf "$OUT/.cxr-subset"

kib=$(du -sk "$OUT" | cut -f1)
echo "gpu bundle $OUT: $((kib / 1024)) MiB ($kib KiB)"
du -sh "$OUT"/wheels "$OUT"/data/* "$OUT"/weights/taef2 | sed 's/^/  /'
ls "$OUT/wheels" | sed 's/^/  wheel: /'
if [ "$kib" -gt $((MAX_MIB * 1024)) ]; then
  echo "error: the bundle is over $MAX_MIB MiB (the device takes 64 MiB with the working tree); drop something." >&2
  exit 1
fi
