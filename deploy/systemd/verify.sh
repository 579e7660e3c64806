#!/usr/bin/env bash
# Checks the example units with systemd-analyze verify, with the pointsman
# binary of this tree standing in for /usr/local/bin/pointsman.
set -euo pipefail
bin=${1:-$(dirname "$0")/../../target/release/pointsman}
[ -x "$bin" ] || { echo "no pointsman binary at $bin: run make build" >&2; exit 1; }
bin=$(realpath "$bin")
cd "$(dirname "$0")"
command -v systemd-analyze >/dev/null || { echo "systemd-analyze is needed: apt-get install systemd" >&2; exit 1; }
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
sed "s#/usr/local/bin/pointsman#$bin#g" pointsman.service >"$dir/pointsman.service"
sed "s#/usr/local/bin/pointsman#$bin#g" web@.service >"$dir/web@.service"
ln -s "web@.service" "$dir/web@8081.service"
out=$(systemd-analyze verify --man=no "$dir/pointsman.service" "$dir/web@8081.service" 2>&1) || {
  echo "$out" >&2
  echo "systemd units: 0 passed, 1 failed"
  exit 1
}
# verify exits 0 on some warnings; any line naming our units is a finding.
if grep -E "pointsman\.service|web@" <<<"$out"; then
  echo "systemd units: 0 passed, 1 failed"
  exit 1
fi
echo "systemd units: 2 passed, 0 failed"
