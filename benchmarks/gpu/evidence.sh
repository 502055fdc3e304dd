#!/usr/bin/env bash
# GPU evidence for issue 16, one command on the device machine (see benchmarks/gpu/README.md):
#   bash benchmarks/gpu/evidence.sh            # on the GPU machine, bundle in .gpu/, results in $OUT
#   DEVICE=cpu bash benchmarks/gpu/evidence.sh # the same at toy sizes on a CPU (also: --dry-run)
# Environment: OUT (results folder; default ./gpu-evidence-out), EVIDENCE_PYTHON (default python3, or
# .venv/bin/python when present in a dry run), GPU_BUNDLE (default .gpu), EVIDENCE_BUDGET_S (default 500:
# all sections; the script stops well inside 9 minutes), EVIDENCE_SECTIONS (a comma list of sections; default all
# but the opt-in segment_recipe; the last one listed gets the time the others leave), DEVICE=cpu or --dry-run for
# the dry run (every section).
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
DRY=""
[ "${DEVICE:-}" = cpu ] && DRY=--dry-run
for a in "$@"; do [ "$a" = --dry-run ] && DRY=--dry-run; done
OUT=${OUT:-$PWD/gpu-evidence-out}
BUNDLE=${GPU_BUNDLE:-.gpu}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/evidence.log") 2>&1
source benchmarks/gpu/device_env.sh
echo "evidence: $(date -u) python=$EVIDENCE_PYTHON bundle=$BUNDLE out=$OUT ${DRY:-(GPU run)}"
"$EVIDENCE_PYTHON" -c "import torch, transformers, huggingface_hub, diffusers, accelerate, omegaconf, webdataset; \
print('versions: torch', torch.__version__, 'transformers', transformers.__version__, 'hf_hub', \
huggingface_hub.__version__, 'diffusers', diffusers.__version__, 'accelerate', accelerate.__version__); \
import dinodiff.train, dinodiff.cache, dinodiff.generate, dinodiff.pipeline, dinodiff.evaluate.segment; \
print('dinodiff stages import')" || echo "warning: an import failed (above); the sections record their own errors"
timeout -k 10 "${EVIDENCE_TIMEOUT_S:-515}" "$EVIDENCE_PYTHON" benchmarks/gpu/evidence.py --out "$OUT" \
  --bundle "$BUNDLE" --budget-s "${EVIDENCE_BUDGET_S:-500}" ${EVIDENCE_SECTIONS:+--sections "$EVIDENCE_SECTIONS"} $DRY
rc=$?
echo "evidence: finished rc=$rc $(date -u)"
ls -la "$OUT"
exit $rc
