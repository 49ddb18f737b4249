#!/usr/bin/env bash
# `make test`: the whole suite, then the compose stack test.
# The compose stack test (tests/infra/test_compose_stack.py: image builds, a stack of containers,
# one DAG run in them) runs after the rest of the suite, alone: its DAG run and the suite's model
# work both need the CPU, and sharing two cores made both slower than running them one after the
# other. Its image builds (~9 min, much of it downloads and unpacking) start first, in the
# background, beside the setup (assets, vLLM's environment, test services) and the suite; the
# test's own build call then finds every layer built.
# Exit status: non-zero when the suite, the image build or the stack test failed.
# Usage: scripts/run_tests.sh [python]   (after `make venv`)
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${1:-.venv/bin/python}"
STACK="${QUANTPIPE_STACK_TEST:-tests/infra/test_compose_stack.py}"
build_log="$(mktemp -t quantpipe-image-build.XXXXXX.log)"
build_pid=""
if [[ -z "${QUANTPIPE_SKIP_IMAGE_PREBUILD:-}" ]] && scripts/ensure_docker.sh "$PY"; then
  PYTHON="$PY" docker/build_images.sh >"$build_log" 2>&1 &
  build_pid=$!
  trap 'kill "$build_pid" 2>/dev/null' INT TERM
else
  echo "images are not built ahead (the stack test builds them, or reports why it cannot)" >"$build_log"
fi
# setup in the foreground (apt and pip must not run twice at once: ensure_docker.sh is done)
make --no-print-directory assets serving-env services PY="$PY" || exit
"$PY" -m pytest -q -p no:cacheprovider --durations=15 --ignore="$STACK" "${QUANTPIPE_SUITE:-tests}"
suite=$?
build=0
if [[ -n "$build_pid" ]]; then wait "$build_pid"; build=$?; fi
echo "================ image build (beside the setup and the suite): exit $build ================"
grep -v -e '^WARNING: Location' "$build_log" | tail -n 15
rm -f "$build_log"
echo "================ $STACK ================"
"$PY" -m pytest -q -p no:cacheprovider -s --durations=5 "$STACK"
stack=$?
echo "suite: exit $suite; image build: exit $build; compose stack test: exit $stack"
(( suite == 0 && build == 0 && stack == 0 ))
