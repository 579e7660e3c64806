#!/usr/bin/env bash
# A rolling deploy and a blue/green switch under load, end to end: a
# throwaway etcd, two pointsman proxies following it, the demo's blue and
# green services run by `pointsman register` sidekicks, and `hey` sending
# keep-alive traffic to both proxies while `pointsman deploy` works.
# Prints every step and, at the end, the requests that failed.
#
#   deploy/demo.sh demo   # make demo: 64 clients for the length of the deploys
#   deploy/demo.sh soak   # make soak: 200 clients, 200,000 requests (as the seeds' hey -n 200000 -c 200)
#
# Everything listens on free 127.0.0.1 ports the kernel hands out; every
# process is stopped on exit, and the logs stay in the directory printed.
# A setup that does not come up (etcd, a proxy) stops the demo at once with
# the reason and the log that says it.
set -euo pipefail

MODE=${1:-demo}
BIN=${POINTSMAN:-target/release/pointsman}
OUT=${OUT:-}
case "$MODE" in
  demo) CLIENTS=64 ;;
  soak) CLIENTS=200 ; REQUESTS=${REQUESTS:-200000} ;;
  *) echo "usage: $0 demo|soak" >&2; exit 2 ;;
esac
for tool in "$BIN" etcd etcdctl hey; do
  command -v "$tool" >/dev/null || [ -x "$tool" ] || { echo "missing: $tool (make demo installs it)" >&2; exit 1; }
done

WORK=$(mktemp -d /tmp/pointsman-deploy-demo.XXXXXX)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for f in "$WORK"/*.pid; do [ -f "$f" ] && kill -TERM "$(cat "$f")" 2>/dev/null || true; done
  sleep 1
  for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  rm -rf "$WORK/etcd"
  echo "logs: $WORK"
}
trap cleanup EXIT

START=$(date +%s.%N)
say() { printf '[%6.1fs] %s\n' "$(awk -v a="$(date +%s.%N)" -v b="$START" 'BEGIN {print a - b}')" "$*"; }

# Ten distinct free ports, held open together while the kernel picks them.
read -r ETCD_CLIENT ETCD_PEER P1 P2 A1 A2 PORT_B1 PORT_B2 PORT_G1 PORT_G2 < <(python3 -c '
import socket
held = [socket.socket() for _ in range(10)]
for s in held:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in held))
')
# fail MESSAGE LOG: says why the demo cannot go on, with the log that tells.
fail() {
  say "$1"
  [ -n "${2:-}" ] && [ -f "$2" ] && { echo "--- $2"; tail -n 40 "$2"; }
  exit 1
}
ETCD=http://127.0.0.1:$ETCD_CLIENT
ctl() { ETCDCTL_API=3 etcdctl --endpoints "$ETCD" "$@" >/dev/null; }

say "etcd on $ETCD"
etcd --name demo --data-dir "$WORK/etcd" \
  --listen-client-urls "$ETCD" --advertise-client-urls "$ETCD" \
  --listen-peer-urls "http://127.0.0.1:$ETCD_PEER" \
  --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER" \
  --initial-cluster "demo=http://127.0.0.1:$ETCD_PEER" >"$WORK/etcd.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do ctl endpoint health 2>/dev/null && break; sleep 0.1; done
ctl endpoint health 2>/dev/null || fail "etcd did not come up on $ETCD" "$WORK/etcd.log"

# Every request goes where map colour's entry `live` points.
ctl put /pointsman/routes/site '{"path_prefix":"/","map":"colour","map_key":"live"}'
ctl put /pointsman/maps/colour/live blue

# One sidekick per instance: it registers the app once it answers, and on
# SIGTERM drains it on every proxy before stopping it.
start_instance() { # service id port version
  local service=$1 id=$2 port=$3 version=$4
  setsid "$BIN" register --etcd "$ETCD" --service "$service" --id "$id" \
    --address "127.0.0.1:$port" --ttl 5s --drain-timeout 20s \
    -- "$BIN" upstream --listen "127.0.0.1:$port" --name "$id-$version" \
    >>"$WORK/$id.log" 2>&1 &
  echo $! >"$WORK/$id.pid"
}
start_instance blue b1 $PORT_B1 v1
start_instance blue b2 $PORT_B2 v1
start_instance green g1 $PORT_G1 v1
start_instance green g2 $PORT_G2 v1

for n in 1 2; do
  port=$([ $n = 1 ] && echo $P1 || echo $P2)
  admin=$([ $n = 1 ] && echo $A1 || echo $A2)
  cat >"$WORK/proxy$n.toml" <<EOF
[global]
admin = "127.0.0.1:$admin"

[[listeners]]
name = "web"
bind = "127.0.0.1:$port"
EOF
  "$BIN" run --config "$WORK/proxy$n.toml" --etcd "$ETCD" --proxy-id "demo-$n" \
    --threads 1 >"$WORK/proxy$n.log" 2>&1 &
  PIDS+=($!)
done
say "proxies on 127.0.0.1:$P1 and 127.0.0.1:$P2 (admin :$A1, :$A2)"
for _ in $(seq 200); do
  curl -fsS "http://127.0.0.1:$P1/" >/dev/null 2>&1 && curl -fsS "http://127.0.0.1:$P2/" >/dev/null 2>&1 && break
  sleep 0.1
done
curl -fsS "http://127.0.0.1:$P1/" >/dev/null || fail "proxy 1 does not serve on 127.0.0.1:$P1" "$WORK/proxy1.log"
curl -fsS "http://127.0.0.1:$P2/" >/dev/null || fail "proxy 2 does not serve on 127.0.0.1:$P2" "$WORK/proxy2.log"

# The load: half the clients on each proxy, keep-alive.
HALF=$((CLIENTS / 2))
if [ "$MODE" = soak ]; then
  LOAD=(-n $((REQUESTS / 2)) -c $HALF)
  say "load: hey -n $REQUESTS -c $CLIENTS over both proxies"
else
  LOAD=(-z 30s -c $HALF)
  say "load: hey -z 30s -c $CLIENTS over both proxies"
fi
hey "${LOAD[@]}" -t 30 "http://127.0.0.1:$P1/" >"$WORK/hey1.txt" 2>&1 &
HEY1=$!
hey "${LOAD[@]}" -t 30 "http://127.0.0.1:$P2/" >"$WORK/hey2.txt" 2>&1 &
HEY2=$!
PIDS+=($HEY1 $HEY2)
sleep 2

say "rolling deploy of blue (v1 -> v2) while it takes the traffic"
STOP="kill -TERM \$(cat $WORK/{id}.pid); while kill -0 \$(cat $WORK/{id}.pid) 2>/dev/null; do sleep 0.05; done"
STARTCMD="port=\$(echo {address} | cut -d: -f2); setsid $BIN register --etcd $ETCD --service {service} --id {id} --address {address} --ttl 5s --drain-timeout 20s -- $BIN upstream --listen {address} --name {id}-v2 >>$WORK/{id}.log 2>&1 & echo \$! > $WORK/{id}.pid"
"$BIN" deploy --etcd "$ETCD" rolling --service blue --stop-cmd "$STOP" --start-cmd "$STARTCMD"

say "blue/green: every request to green"
"$BIN" deploy --etcd "$ETCD" switch --map colour --key live --to green --drain-old
sleep 2
say "and back to blue (now v2)"
"$BIN" deploy --etcd "$ETCD" rollback --map colour --key live --drain-old

say "waiting for the load to finish"
wait $HEY1 $HEY2 || true

total=0; ok=0; failed=0
for f in "$WORK/hey1.txt" "$WORK/hey2.txt"; do
  t=$(awk '/\[[0-9]+\][[:space:]]+[0-9]+ responses/ {gsub(/[^0-9 ]/," "); split($0,a," "); s+=a[2]} END {print s+0}' "$f")
  o=$(awk '/\[200\][[:space:]]+[0-9]+ responses/ {gsub(/[^0-9 ]/," "); split($0,a," "); s+=a[2]} END {print s+0}' "$f")
  e=$(awk '/^Error distribution:/ {on=1; next} on && /\[[0-9]+\]/ {gsub(/^[[:space:]]*\[/,""); split($0,a,"]"); s+=a[1]} END {print s+0}' "$f")
  total=$((total + t + e)); ok=$((ok + o)); failed=$((failed + t - o + e))
  [ "$o" -gt 0 ] || { echo "--- $f"; cat "$f"; fail "no request through $(basename "$f" .txt) was answered 200"; }
done
rps=$(awk '/Requests\/sec:/ {s+=$2} END {printf "%.0f", s}' "$WORK/hey1.txt" "$WORK/hey2.txt")
p99=$(awk '/99%% in/ || /  99% in/ {print $3; exit}' "$WORK/hey1.txt")
echo
echo "requests: $total, answered 200: $ok, failed: $failed (non-200 or no answer)"
echo "throughput: $rps req/s over both proxies; p99 (proxy 1): ${p99}s"
if [ -n "$OUT" ]; then
  {
    echo "mode=$MODE clients=$CLIENTS requests=$total ok=$ok failed=$failed rps=$rps p99_s=$p99"
    echo "--- proxy 1"; cat "$WORK/hey1.txt"; echo "--- proxy 2"; cat "$WORK/hey2.txt"
  } >"$OUT"
fi
[ "$failed" -eq 0 ]
