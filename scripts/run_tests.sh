#!/usr/bin/env bash
# `make test`: the whole suite. The compose stack test (tests/infra/test_compose_stack.py: image
# builds, a stack of containers, one DAG run) spends much of its ~20 minutes waiting on containers
# and builds, so it runs in a pytest process of its own beside the rest of the suite instead of
# after it; its output follows the suite's. Exit status: non-zero when either failed.
# Usage: scripts/run_tests.sh [python]
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${1:-.venv/bin/python}"
STACK="${QUANTPIPE_STACK_TEST:-tests/infra/test_compose_stack.py}"
log="$(mktemp -t quantpipe-compose-test.XXXXXX.log)"
"$PY" -m pytest -q -p no:cacheprovider -s --durations=5 "$STACK" >"$log" 2>&1 &
stack_pid=$!
trap 'kill "$stack_pid" 2>/dev/null' INT TERM
"$PY" -m pytest -q -p no:cacheprovider --durations=15 --ignore="$STACK" "${QUANTPIPE_SUITE:-tests}"
suite=$?
wait "$stack_pid"
stack=$?
echo "================ $STACK (ran beside the suite) ================"
grep -v -e 'it/s\]' -e '^WARNING: Location' "$log" | tail -n 80
rm -f "$log"
echo "suite: exit $suite; compose stack test: exit $stack"
(( suite == 0 && stack == 0 ))
