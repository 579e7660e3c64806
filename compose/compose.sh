#!/usr/bin/env bash
# Runs Compose on compose/compose.yaml: `docker compose` where the plugin is
# installed, else the standalone docker-compose 1.x of Debian 12, which does
# not know the top-level `name:` key: it gets a copy without it and the same
# project name with -p.
#
# usage: compose/compose.sh ARGS...   e.g. compose/compose.sh ps
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
if docker compose version >/dev/null 2>&1; then
  exec docker compose -f "$here/compose.yaml" "$@"
fi
command -v docker-compose >/dev/null || {
  echo "compose: neither 'docker compose' nor docker-compose is installed: apt-get install docker-compose" >&2
  exit 1
}
sed '/^name:/d' "$here/compose.yaml" >"$here/.compose-v1.yaml"
exec docker-compose -p pointsman --project-directory "$here" -f "$here/.compose-v1.yaml" "$@"
