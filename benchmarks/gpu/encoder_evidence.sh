#!/usr/bin/env bash
# Issue 12 on the GPU, one command (see benchmarks/gpu/README.md "Domain encoder in one command"):
#   bash benchmarks/gpu/encoder_evidence.sh            # on the GPU machine, bundle in .gpu/, results in $OUT
#   DEVICE=cpu bash benchmarks/gpu/encoder_evidence.sh # the same at toy sizes on a CPU (also: --dry-run)
# 1. `pretrain-encoder --config gpu-encoder` on the train split of the 300 real CXRs (.gpu/data/cxr-covid) with the
#    recipe that learnt on the CPU (BatchNorm head, mean centring, teacher T 0.04, KoLeo 0.1; BENCHMARKS.md
#    "Domain encoder", run M) scaled up: a 192-d, 6-layer ViT, patch 8, 96 px global / 48 px local crops, batch 128;
# 2. `probe-encoder RUN/encoder-init RUN/encoder` (the same ViT at step 0 vs pretrained) at 128 px with the 0/1
#    `covid` label (.gpu/data/cxr-covid-labelled): the probe leaves out the images the encoder trained on (matched
#    by source file), so it measures the bundle's test split (--test-fraction 0.1 in bundle.sh, ~30 images).
# The whole script stops within ENC_TOTAL_S (default 265 s): training gets what is left after the wheel install
# minus ENC_PROBE_RESERVE_S (default 55 s) for the probe; if `timeout` stops training first, the newest
# checkpoint's exported teacher (checkpoints every 250 steps) becomes RUN/encoder, and the log says which step.
# $OUT gets (flat, 6 files): encoder_evidence.log, metrics.csv, config.yaml, results.json, table.md and
# encoder.tar (RUN/encoder, ~11 MB fp32: `tar xf encoder.tar` -> encoder/, for model.encoder.name_or_path=encoder).
# Environment: OUT (default ./encoder-evidence-out), EVIDENCE_PYTHON (default python3, or .venv/bin/python in a
# dry run), GPU_BUNDLE (default .gpu), ENC_RUN_DIR (default /tmp/dinodiff-encoder-run), ENC_MAX_STEPS (GPU
# default 2500), ENC_TOTAL_S, ENC_PROBE_RESERVE_S, ENC_EXTRA (more dotted overrides for pretrain-encoder).
set -uo pipefail
cd "$(dirname "$0")/../.."
START=$(date +%s)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
DRY=""
[ "${DEVICE:-}" = cpu ] && DRY=1
for a in "$@"; do [ "$a" = --dry-run ] && DRY=1; done
OUT=${OUT:-$PWD/encoder-evidence-out}
BUNDLE=${GPU_BUNDLE:-.gpu}
RUN=${ENC_RUN_DIR:-/tmp/dinodiff-encoder-run}
TOTAL=${ENC_TOTAL_S:-265}
RESERVE=${ENC_PROBE_RESERVE_S:-55}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/encoder_evidence.log") 2>&1
source benchmarks/gpu/device_env.sh
PY=$EVIDENCE_PYTHON
echo "encoder evidence: $(date -u) python=$PY bundle=$BUNDLE run=$RUN out=$OUT ${DRY:+(CPU dry run)}"
for d in "$BUNDLE/data/cxr-covid" "$BUNDLE/data/cxr-covid-labelled"; do
  [ -f "$d/manifest.json" ] || { echo "error: $d/manifest.json missing: run 'make gpu-bundle' here and carry .gpu"; exit 2; }
done
"$PY" -c "import torch, torchvision, timm, lightly, omegaconf, accelerate, sklearn; \
print('versions: torch', torch.__version__, 'torchvision', torchvision.__version__, 'lightly', lightly.__version__, \
'timm', timm.__version__, 'accelerate', accelerate.__version__, 'cuda', torch.cuda.is_available())" \
  || echo "warning: an import failed (above)"

# The recipe (see the header). Dry run: the same stage and flow at toy sizes, a few steps, on fp32 CPU.
COMMON=(loss.centering=mean loss.warmup_teacher_temp=0.04 loss.teacher_temp=0.04 loss.warmup_teacher_temp_steps=0
  loss.koleo_weight=0.1 head.batch_norm=true head.norm_last_layer=true head.freeze_last_layer_steps=0
  "augment.global_scale=[0.5,1.0]" "augment.local_scale=[0.2,0.5]" backbone.num_registers=4 backbone.drop_path=0.0
  data.split=train optim.min_lr=1.0e-5 optim.weight_decay=0.04 run.momentum_start=0.99 run.stop_on_collapse=false
  run.keep_last=2 "run.run_dir=$RUN")
if [ -z "$DRY" ]; then
  SIZE=(backbone.image_size=96 backbone.patch_size=8 backbone.hidden_size=192 backbone.num_layers=6
    backbone.num_heads=3 head.hidden_dim=1024 head.bottleneck_dim=128 head.output_dim=1024 augment.local_crops=4
    augment.local_size=48 data.load_size=128 data.num_workers=10 optim.lr=5.0e-4 optim.warmup_steps=150
    run.batch_size=128 "run.max_steps=${ENC_MAX_STEPS:-2500}" run.log_every=25 run.checkpoint_every=250
    run.mixed_precision=bf16)
else
  SIZE=(backbone.image_size=32 backbone.patch_size=8 backbone.hidden_size=32 backbone.num_layers=2
    backbone.num_heads=2 head.hidden_dim=64 head.bottleneck_dim=16 head.output_dim=64 augment.local_crops=2
    augment.local_size=16 data.load_size=64 data.num_workers=0 data.max_images=24 optim.lr=5.0e-4
    optim.warmup_steps=2 run.batch_size=8 "run.max_steps=${ENC_MAX_STEPS:-6}" run.log_every=1
    run.checkpoint_every=3)  # mixed_precision auto: fp32 on a CPU
fi
rm -rf "$RUN"
pretrain() {  # pretrain-encoder for what is left of the budget; extra dotted overrides as arguments
  local left=$(( TOTAL - ($(date +%s) - START) - RESERVE )) t0=$(date +%s)
  [ "$left" -lt 20 ] && left=20
  echo "pretrain-encoder: up to ${left} s (timeout); overrides: ${SIZE[*]} ${COMMON[*]} ${ENC_EXTRA:-} $*"
  # shellcheck disable=SC2086
  timeout -k 5 "$left" "$PY" -m dinodiff.cli pretrain-encoder --config gpu-encoder "data.shards=$BUNDLE/data/cxr-covid" \
    "${SIZE[@]}" "${COMMON[@]}" ${ENC_EXTRA:-} "$@"
  rc=$?
  echo "pretrain-encoder: rc=$rc after $(( $(date +%s) - t0 )) s"
}
[ -z "$DRY" ] && df -h /dev/shm 2>/dev/null | tail -n 1 | sed 's/^/shm: /'
pretrain
# A start-up failure (e.g. DataLoader workers out of shared memory) leaves no checkpoint: retry once in-process.
if [ "$rc" != 0 ] && [ "$rc" != 124 ] && [ "$rc" != 137 ] && ! ls -d "$RUN"/checkpoints/checkpoint-* >/dev/null 2>&1 \
   && [ $(( TOTAL - ($(date +%s) - START) - RESERVE )) -gt 60 ]; then
  echo "pretrain-encoder failed before its first checkpoint: retrying with data.num_workers=0"
  rm -rf "$RUN"
  pretrain data.num_workers=0
fi
if [ ! -f "$RUN/encoder/model.safetensors" ]; then
  last=$(ls -d "$RUN"/checkpoints/checkpoint-*/encoder 2>/dev/null | sort -V | tail -n 1)
  if [ -n "$last" ]; then
    echo "pretrain-encoder stopped early: exporting the newest checkpoint's teacher, $last"
    rm -rf "$RUN/encoder" && cp -r "$last" "$RUN/encoder"
  else
    echo "error: no encoder and no checkpoint in $RUN"
  fi
fi
"$PY" -c "import json,sys; r=json.load(open(sys.argv[1])); print('encoder: step', r['step'], 'images seen', r['images_seen'])" \
  "$RUN/encoder/dinodiff_encoder.json" 2>/dev/null || true
[ -f "$RUN/metrics.csv" ] && { echo "metrics (first and last rows):"; head -n 3 "$RUN/metrics.csv"; tail -n 3 "$RUN/metrics.csv"; }

encoders=()
for e in "$RUN/encoder-init" "$RUN/encoder"; do [ -f "$e/model.safetensors" ] && encoders+=("$e"); done
[ ${#encoders[@]} = 0 ] && { echo "error: no encoder folder to probe in $RUN"; exit 1; }
probe_left=$(( TOTAL - ($(date +%s) - START) - 5 ))
[ "$probe_left" -lt 30 ] && probe_left=30
echo "probe-encoder: ${encoders[*]} (timeout ${probe_left} s)"
timeout -k 5 "$probe_left" "$PY" -m dinodiff.cli probe-encoder "${encoders[@]}" \
  --data "$BUNDLE/data/cxr-covid-labelled" --labels covid --out "$RUN/probe"
prc=$?
echo "probe-encoder: rc=$prc"

for f in "$RUN/metrics.csv" "$RUN/config.yaml" "$RUN/probe/results.json" "$RUN/probe/table.md"; do
  [ -f "$f" ] && cp "$f" "$OUT/"
done
[ -d "$RUN/encoder" ] && tar -C "$RUN" -cf "$OUT/encoder.tar" encoder
echo "encoder evidence: finished in $(( $(date +%s) - START )) s $(date -u)"
ls -la "$OUT"
[ "$prc" = 0 ] && [ -f "$RUN/encoder/model.safetensors" ]
