# Sourced by the device scripts (evidence.sh, encoder_evidence.sh): the interpreter, and on the device the
# bundle's wheels (what its image lacks; its own torch/transformers/huggingface_hub stay) on PYTHONPATH.
# Needs BUNDLE and DRY (empty on the device); sets EVIDENCE_PYTHON and PYTHONPATH.
if [ -z "${EVIDENCE_PYTHON:-}" ]; then
  EVIDENCE_PYTHON=python3
  [ -n "$DRY" ] && [ -x .venv/bin/python ] && EVIDENCE_PYTHON=.venv/bin/python
fi
if [ -z "$DRY" ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$EVIDENCE_PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$BUNDLE"/wheels/*.whl || echo "warning: wheel install failed"
  export PYTHONPATH="/tmp/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
