#!/usr/bin/env bash
# Browser for tests/ui/test_browser.py: Debian's chromium plus the playwright Python package
# (no browser download: the test launches /usr/bin/chromium). Idempotent.
#   scripts/setup_browser.sh            # uses .venv/bin/python
#   PYTHON=/path/to/python scripts/setup_browser.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
if ! command -v chromium >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq chromium
fi
PW_PIN="$(grep -E '^playwright==' requirements-dev.txt | head -n1)"
if ! "$PYTHON" -c "import playwright" 2>/dev/null; then
  "$PYTHON" -m pip install -q "${PW_PIN:-playwright}"
fi
chromium --version
"$PYTHON" -c "from importlib.metadata import version; print('playwright', version('playwright'))"
