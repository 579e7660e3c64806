#!/usr/bin/env bash
# Builds the compose stack's images on a machine that cannot pull any image:
# a Debian 12 root filesystem made with debootstrap from this machine's own
# apt sources, imported as pointsman-base:bookworm, stands in for the
# public base images, and the pointsman binary built here stands in for the
# Rust builder stage. The Dockerfiles are the ones users with internet build.
#
# usage: compose/offline-images.sh PATH-TO-POINTSMAN-BINARY
set -euo pipefail
cd "$(dirname "$0")/.."

binary=${1:?usage: compose/offline-images.sh PATH-TO-POINTSMAN-BINARY}
base=${BASE_IMAGE:-pointsman-base:bookworm}
# Everything the three images need, so their `apt-get` steps are skipped.
packages=ca-certificates,curl,etcd-server,etcd-client,hey

command -v docker >/dev/null || {
  echo "compose: Docker is needed (docker not found): install docker.io and docker-compose" >&2
  exit 1
}

if ! docker image inspect "$base" >/dev/null 2>&1; then
  command -v debootstrap >/dev/null || {
    echo "compose: debootstrap is needed to build $base: apt-get install debootstrap" >&2
    exit 1
  }
  mirror=$(sed -n 's/^URIs: *\([^ ]*\).*/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)
  if [ -z "$mirror" ]; then
    mirror=$(awk '$1 == "deb" { print $2; exit }' /etc/apt/sources.list 2>/dev/null || true)
  fi
  mirror=${mirror:-http://deb.debian.org/debian}
  root=$(mktemp -d /tmp/pointsman-rootfs.XXXXXX)
  trap 'rm -rf "$root"' EXIT
  echo "compose: building $base with debootstrap from $mirror"
  debootstrap --variant=minbase --include="$packages" bookworm "$root" "$mirror" >"$root.log" 2>&1 || {
    tail -20 "$root.log" >&2
    exit 1
  }
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  tar -C "$root" -c . | docker import --change 'CMD ["/bin/bash"]' - "$base" >/dev/null
  rm -f "$root.log"
fi

install -m 0755 "$binary" compose/.bin/pointsman
build() { # image dockerfile [docker build args...]
  local image=$1 file=$2
  shift 2
  echo "compose: building $image"
  local out
  out=$(docker build -q -t "$image" -f "$file" --build-arg BASE_IMAGE="$base" "$@" . 2>&1) || {
    echo "$out" >&2
    exit 1
  }
}
build pointsman:local compose/Dockerfile --target prebuilt
build pointsman-etcd:local compose/etcd.Dockerfile
build pointsman-client:local compose/client.Dockerfile
