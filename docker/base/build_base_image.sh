#!/usr/bin/env bash
# Builds the base image every Dockerfile of this project starts FROM: Debian bookworm (minbase)
# made with debootstrap from the host's Debian mirror, imported as ${BASE_IMAGE}. No image
# registry is needed (none is reachable on machines of this kind).
#
#   docker/base/build_base_image.sh            # builds local/debian:bookworm unless present
#   FORCE=1 docker/base/build_base_image.sh    # rebuilds it
#   DEBIAN_MIRROR=http://deb.debian.org/debian docker/base/build_base_image.sh
set -euo pipefail
BASE_IMAGE="${BASE_IMAGE:-local/debian:bookworm}"
if [[ -z "${FORCE:-}" ]] && docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
  echo "base image $BASE_IMAGE present"
  exit 0
fi
command -v debootstrap >/dev/null || { echo "debootstrap is missing: apt-get install -y debootstrap" >&2; exit 2; }
mirror="${DEBIAN_MIRROR:-}"
if [[ -z "$mirror" ]]; then
  # the mirror this host's apt uses (deb822 sources first, then the classic list)
  mirror="$(sed -n 's/^URIs:[[:space:]]*\([^[:space:]]*\/debian\)$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -1)"
  [[ -n "$mirror" ]] || mirror="$(awk '$1=="deb" && $2 ~ /\/debian\/?$/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)"
  [[ -n "$mirror" ]] || mirror="http://deb.debian.org/debian"
fi
rootfs="$(mktemp -d)"
trap 'rm -rf "$rootfs"' EXIT
echo "debootstrap bookworm from $mirror"
debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >/dev/null
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
tar -C "$rootfs" -c . | docker import -c 'ENV LANG=C.UTF-8' - "$BASE_IMAGE" >/dev/null
echo "built $BASE_IMAGE ($(docker image inspect -f '{{.Size}}' "$BASE_IMAGE") bytes)"
