#!/usr/bin/env bash
# `make test`: the setup, the whole suite, then the compose stack test.
# - vLLM's serving environment (~5 min of pip, no apt) is made in the background beside the
#   other setup steps (venv, assets, test services, browser), which run in order (apt twice at
#   once would fail on its lock).
# - The compose stack test (tests/infra/test_compose_stack.py: image builds, a stack of
#   containers, one DAG run in them) runs after the rest of the suite, alone: its DAG run and the
#   suite's model work both need the CPU, and sharing two cores made both slower than running
#   them one after the other. Its image builds (~9 min cold, much of it downloads, unpacking and
#   layer writes) run in the background beside the suite; the test's own build call then finds
#   every layer built.
# Exit status: non-zero when the setup, the suite, the image build or the stack test failed.
# Usage: scripts/run_tests.sh [python]
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${1:-.venv/bin/python}"
STACK="${QUANTPIPE_STACK_TEST:-tests/infra/test_compose_stack.py}"
logs="$(mktemp -d -t quantpipe-make-test.XXXXXX)"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; rm -rf "$logs"' EXIT

t0=$SECONDS
scripts/setup_serving_env.sh >"$logs/serving-env.log" 2>&1 &
serving_pid=$!; pids+=("$serving_pid")
make --no-print-directory venv assets services || exit
wait "$serving_pid" || { grep -v '^WARNING: Location' "$logs/serving-env.log" | tail -n 30; echo "serving env failed" >&2; exit 1; }
grep -v '^WARNING: Location' "$logs/serving-env.log" | tail -n 2
echo "setup: $((SECONDS - t0)) s"

build_pid=""
if [[ -z "${QUANTPIPE_SKIP_IMAGE_PREBUILD:-}" ]] && scripts/ensure_docker.sh "$PY"; then
  PYTHON="$PY" docker/build_images.sh >"$logs/image-build.log" 2>&1 &
  build_pid=$!; pids+=("$build_pid")
else
  echo "images are not built ahead (the stack test builds them, or reports why it cannot)" >"$logs/image-build.log"
fi
t1=$SECONDS
"$PY" -m pytest -q -p no:cacheprovider --durations=${QUANTPIPE_DURATIONS:-30} --ignore="$STACK" "${QUANTPIPE_SUITE:-tests}"
suite=$?
echo "suite: $((SECONDS - t1)) s"
build=0
if [[ -n "$build_pid" ]]; then wait "$build_pid"; build=$?; fi
echo "================ image build (beside the suite): exit $build ================"
grep -v -e '^WARNING: Location' "$logs/image-build.log" | tail -n 15
echo "================ $STACK ================"
t2=$SECONDS
"$PY" -m pytest -q -p no:cacheprovider -s --durations=5 "$STACK"
stack=$?
echo "stack test: $((SECONDS - t2)) s; make test: $((SECONDS - t0)) s"
echo "suite: exit $suite; image build: exit $build; compose stack test: exit $stack"
(( suite == 0 && build == 0 && stack == 0 ))
