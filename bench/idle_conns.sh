#!/usr/bin/env bash
# Memory per idle keep-alive client connection: pointsman next to HAProxy.
#
#   cargo build --release && bash bench/idle_conns.sh
#
# For each target: start it in front of an nginx backend on 127.0.0.1, warm
# it up, read its RSS, open CONNS keep-alive connections that each make one
# GET and then sit idle (bench/idle_client.py), read the RSS again:
# (after - before) / connections is the memory an idle connection costs.
#
# Environment:
#   CONNS=10000         idle connections (HAProxy and nginx get fewer if the
#                       open-files limit cannot fit them: they need two per connection)
#   TARGETS="pointsman haproxy"   (also: nginx)
#   THREADS=2           pointsman --threads / HAProxy nbthread (nginx: 1 worker)
#   PARALLEL=256        connections being opened at once
#   SETTLE=2            seconds between the last connection and the reading
#   CYCLES=2            open-hold-close cycles per target (memory kept after closing)
#   POINTSMAN_BIN=...   default: target/release/pointsman (copied before the run)
#   RESULTS=...         default: bench/results/idle_conns.md
#   KEEP_TMP=1          keep the temp dir (configs, logs)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CMDLINE="$(printf '%q ' "$0" "$@")"
CMDLINE="${CMDLINE% }"

CONNS="${CONNS:-10000}"
TARGETS="${TARGETS:-pointsman haproxy}"
THREADS="${THREADS:-2}"
PARALLEL="${PARALLEL:-256}"
SETTLE="${SETTLE:-2}"
CYCLES="${CYCLES:-2}"
POINTSMAN_BIN="${POINTSMAN_BIN:-$ROOT/target/release/pointsman}"
RESULTS="${RESULTS:-$ROOT/bench/results/idle_conns.md}"
KEEP_TMP="${KEEP_TMP:-0}"
CLIENT="$ROOT/bench/idle_client.py"

die() { echo "idle_conns: $*" >&2; exit 1; }
log() { echo "idle_conns: $*" >&2; }

for t in $TARGETS; do
  case "$t" in pointsman|haproxy|nginx) ;; *) die "unknown target '$t' (known: pointsman haproxy nginx)" ;; esac
done
[[ "$CONNS" =~ ^[1-9][0-9]*$ ]] || die "CONNS must be a positive integer"
[[ "$THREADS" =~ ^[1-9][0-9]*$ ]] || die "THREADS must be a positive integer"
[[ "$CYCLES" =~ ^[1-9][0-9]*$ ]] || die "CYCLES must be a positive integer"
need() { command -v "$1" >/dev/null 2>&1 || die "$1 not found (apt-get install -y $2)"; }
need nginx nginx
need python3 python3
need ss iproute2
[[ " $TARGETS " == *" haproxy "* ]] && need haproxy haproxy
if [[ " $TARGETS " == *" pointsman "* ]]; then
  [[ -x "$POINTSMAN_BIN" ]] || die "$POINTSMAN_BIN not found: run 'cargo build --release' first"
fi
[[ -f "$CLIENT" ]] || die "$CLIENT not found"

# Descriptors: the client and pointsman need one per connection, HAProxy and
# nginx two. Raise the limit as far as allowed (a container without
# CAP_SYS_RESOURCE keeps its hard limit).
want=$((2 * CONNS + 1000))
cur="$(ulimit -n)"
if [[ "$cur" != unlimited ]] && ((cur < want)); then
  ulimit -n "$want" 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
fi
NOFILE="$(ulimit -n)"
[[ "$NOFILE" == unlimited ]] && NOFILE=1048576
((NOFILE >= CONNS + 200)) || die "open-files limit $NOFILE is too low for $CONNS connections (CONNS=... to use fewer)"

TMP="$(mktemp -d "${TMPDIR:-/tmp}/pointsman-idle.XXXXXX")"
chmod 755 "$TMP" # nginx workers (user nobody when started as root) may need to reach it
# Paths given relative to where we were started, then work inside $TMP.
POINTSMAN_BIN="$(realpath -m "$POINTSMAN_BIN")"
RESULTS="$(realpath -m "$RESULTS")"
cd "$TMP"
PIDS=()

children_of() {
  cat /proc/"$1"/task/*/children 2>/dev/null | tr ' ' '\n' | sed '/^$/d' | sort -u | tr '\n' ' '
}

stop_pid() {
  local pid="$1" i kids
  kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 50; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    kids="$(children_of "$pid")"
    # shellcheck disable=SC2086 # one word per pid
    kill -KILL "$pid" $kids 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
}

cleanup() {
  local rc=$? pid
  trap - EXIT INT TERM
  exec 3>&- 2>/dev/null || true
  for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
  if [[ "$KEEP_TMP" == 1 ]]; then log "temp dir kept: $TMP"; else rm -rf "$TMP"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

start() { # name cmd...
  local name="$1"; shift
  "$@" >"$TMP/$name.log" 2>&1 &
  LAST_PID=$!
  PIDS+=("$LAST_PID")
}

forget() { # pid: stopped, drop from PIDS
  local p keep=()
  for p in "${PIDS[@]}"; do [[ "$p" == "$1" ]] || keep+=("$p"); done
  PIDS=("${keep[@]+"${keep[@]}"}")
}

free_ports() {
  # Outside the ephemeral port range, so that no client connection of this
  # run (10,000s of them) can be holding the port when a proxy binds it.
  python3 - "$1" <<'EOF'
import random, socket, sys
lo, hi = map(int, open("/proc/sys/net/ipv4/ip_local_port_range").read().split())
pool = range(max(1024, lo - 12000), lo) if lo - 1024 >= 2000 else range(hi + 1, 65536)
ports = []
for port in random.sample(pool, len(pool)):
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))  # no SO_REUSEADDR: fails on TIME_WAIT too
    except OSError:
        continue
    finally:
        s.close()
    ports.append(port)
    if len(ports) == int(sys.argv[1]):
        break
print(" ".join(map(str, ports)))
EOF
}

http_get() {
  python3 -c 'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=2).read().decode())' "$1"
}

wait_http() { # name pid url
  local i body
  for ((i = 0; i < 100; i++)); do
    kill -0 "$2" 2>/dev/null || { cat "$TMP/$1.log" >&2; die "$1 exited at start"; }
    body="$(http_get "$3" 2>/dev/null || true)"
    [[ "$body" == hello* ]] && return 0
    sleep 0.1
  done
  cat "$TMP/$1.log" >&2
  die "$1 did not answer on $3"
}

mem_kib() { # field pids...: VmRSS or VmHWM summed, KiB
  local field="$1" pid total=0 v
  shift
  for pid in "$@"; do
    v="$(awk -v f="$field:" '$1 == f {print $2}' /proc/"$pid"/status 2>/dev/null || true)"
    total=$((total + ${v:-0}))
  done
  echo "$total"
}

established() { # port: established connections to it (server side)
  ss -Htn state established "( sport = :$1 )" 2>/dev/null | wc -l
}

# --- backend and targets ---------------------------------------------------------

read -r BACKEND_PORT <<<"$(free_ports 1)"
BACKEND="127.0.0.1:$BACKEND_PORT"

nginx_conf() { # name listen http-extra server-body
  cat <<EOF
worker_processes 1;
worker_rlimit_nofile $NOFILE;
pid $TMP/$1.pid;
error_log $TMP/$1.error.log warn;
events { worker_connections $((NOFILE - 100)); multi_accept on; }
http {
    access_log off;
    client_body_temp_path $TMP/$1-body;
    proxy_temp_path $TMP/$1-proxy;
    fastcgi_temp_path $TMP/$1-fastcgi;
    uwsgi_temp_path $TMP/$1-uwsgi;
    scgi_temp_path $TMP/$1-scgi;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
$3
    server {
        listen $2 backlog=4096;
$4
    }
}
EOF
}

start_nginx() { # name conf-file
  mkdir -p "$TMP/$1"-{body,proxy,fastcgi,uwsgi,scgi}
  start "$1" nginx -p "$TMP" -e "$TMP/$1.error.log" -c "$2" -g 'daemon off;'
}

nginx_conf backend "$BACKEND" "" '        location / { default_type text/plain; return 200 "hello\n"; }' >"$TMP/backend.conf"
start_nginx backend "$TMP/backend.conf"
BACKEND_PID="$LAST_PID"
wait_http backend "$BACKEND_PID" "http://$BACKEND/"

if [[ " $TARGETS " == *" pointsman "* ]]; then
  PSBIN="$TMP/pointsman"
  cp "$POINTSMAN_BIN" "$PSBIN"
fi

# HAProxy refuses to start when maxconn needs more descriptors than allowed.
HAPROXY_MAXCONN=$(((NOFILE - 100) / 2))
((HAPROXY_MAXCONN > CONNS + 50)) && HAPROXY_MAXCONN=$((CONNS + 50))

start_target() { # target port: sets TARGET_PID, TARGET_CONNS
  local t="$1" port="$2"
  TARGET_CONNS="$CONNS"
  case "$t" in
    pointsman)
      cat >"$TMP/pointsman.toml" <<EOF
[global]
admin = "127.0.0.1:$ADMIN_PORT"
drain_timeout = "1s"
max_connections = $((CONNS + 100))
idle_timeout = "600s"
# pointsman also closes idle keep-alive connections header_read_timeout
# (10 s by default) after their last response, idle_timeout notwithstanding:
# keep them open for the whole measurement.
header_read_timeout = "600s"

[[listeners]]
name = "web"
bind = "127.0.0.1:$port"
default_service = "backend"

[services.backend]
endpoints = [{ id = "nginx", address = "$BACKEND" }]
EOF
      start "$t" env POINTSMAN_LOG=warn "$PSBIN" run --config "$TMP/pointsman.toml" --threads "$THREADS"
      ;;
    haproxy)
      ((TARGET_CONNS > HAPROXY_MAXCONN - 50)) && TARGET_CONNS=$((HAPROXY_MAXCONN - 50))
      cat >"$TMP/haproxy.cfg" <<EOF
global
    nbthread $THREADS
    maxconn $HAPROXY_MAXCONN
    pidfile $TMP/haproxy.pid

defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 3s
    timeout client 600s
    timeout server 60s
    timeout http-request 10s
    timeout http-keep-alive 600s
    maxconn $HAPROXY_MAXCONN

frontend fe
    bind 127.0.0.1:$port
    default_backend be

backend be
    server nginx $BACKEND
EOF
      start "$t" haproxy -f "$TMP/haproxy.cfg" -db
      ;;
    nginx)
      ((TARGET_CONNS > NOFILE / 2 - 200)) && TARGET_CONNS=$((NOFILE / 2 - 200))
      nginx_conf nginxproxy "127.0.0.1:$port" "    upstream backend { server $BACKEND; keepalive 64; }" \
        '        location / { proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection ""; }' \
        >"$TMP/nginxproxy.conf"
      start_nginx nginxproxy "$TMP/nginxproxy.conf"
      ;;
  esac
  TARGET_PID="$LAST_PID"
  wait_http "$t" "$TARGET_PID" "http://127.0.0.1:$port/"
}

describe() {
  case "$1" in
    pointsman) echo "pointsman, --threads $THREADS" ;;
    haproxy) echo "HAProxy, nbthread $THREADS" ;;
    nginx) echo "nginx proxy, 1 worker" ;;
  esac
}

# --- measure -----------------------------------------------------------------------

mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }

open_idle() { # port count: start the client, wait until its connections are idle
  rm -f "$TMP/client.in" "$TMP/client.log"
  mkfifo "$TMP/client.in"
  exec 3<>"$TMP/client.in" # our end: a line written here releases the client
  # (not through start: a background command's stdin would be /dev/null)
  timeout 300 python3 "$CLIENT" 127.0.0.1 "$1" "$2" \
    --parallel "$PARALLEL" --hold 120 --setup-timeout 180 <"$TMP/client.in" >"$TMP/client.log" 2>&1 &
  CLIENT_PID=$!
  PIDS+=("$CLIENT_PID")
  local i
  for ((i = 0; i < 2000; i++)); do # 200 s at most
    grep -q '^ready' "$TMP/client.log" 2>/dev/null && break
    kill -0 "$CLIENT_PID" 2>/dev/null || { cat "$TMP/client.log" >&2; die "client exited early"; }
    sleep 0.1
  done
  grep -q '^ready' "$TMP/client.log" || { cat "$TMP/client.log" >&2; die "client did not get ready"; }
  read -r _ OPENED FAILED < <(grep '^ready' "$TMP/client.log")
  ((OPENED > 0)) || { cat "$TMP/client.log" >&2; die "no connection opened"; }
}

close_idle() { # release the client: it closes its connections and exits
  local i
  echo >&3
  exec 3>&-
  for ((i = 0; i < 100; i++)); do kill -0 "$CLIENT_PID" 2>/dev/null || break; sleep 0.1; done
  stop_pid "$CLIENT_PID"; forget "$CLIENT_PID"
  STILL_OPEN="$(awk '/^closed/ {print $2}' "$TMP/client.log")"
}

ROWS=()
ROWS_SHORT=0
for t in $TARGETS; do
  read -r PORT ADMIN_PORT <<<"$(free_ports 2)"
  start_target "$t" "$PORT"
  pids() { echo "$TARGET_PID $(children_of "$TARGET_PID")"; }
  rss() { local p; read -r -a p <<<"$(pids)"; mem_kib "$1" "${p[@]}"; }

  # Warm up: allocator arenas, upstream pool, a few thousand requests.
  if command -v wrk >/dev/null 2>&1; then
    wrk -t1 -c16 -d2s "http://127.0.0.1:$PORT/" >"$TMP/$t.warmup.txt" 2>&1 || true
  fi
  sleep 1
  before="$(rss VmRSS)"

  closed_rss=()
  for ((c = 1; c <= CYCLES; c++)); do
    log "$t: cycle $c: opening $TARGET_CONNS idle keep-alive connections"
    open_idle "$PORT" "$TARGET_CONNS"
    sleep "$SETTLE"
    kill -0 "$TARGET_PID" 2>/dev/null || { cat "$TMP/$t.log" >&2; die "$t died"; }
    held="$(established "$PORT")"
    idle_rss="$(rss VmRSS)"
    if ((c == 1)); then
      opened="$OPENED" failed="$FAILED" after="$idle_rss" held1="$held"
    fi
    close_idle
    sleep "$SETTLE"
    closed_rss+=("$(mib "$(rss VmRSS)")")
    log "$t: cycle $c: $OPENED open ($FAILED failed), $held established at the reading, ${STILL_OPEN:-?} not closed by $t meanwhile; RSS $(mib "$idle_rss") MiB, $(mib "$(rss VmRSS)") MiB after closing"
  done
  peak="$(rss VmHWM)"
  # per connection still open at the reading (the proxy may have closed some)
  per="$(awk -v a="$after" -v b="$before" -v n="$held1" 'BEGIN { printf "%.1f", (n > 0 ? (a - b) / n : 0) }')"
  ((held1 == opened)) || log "warning: $t held $held1 of the $opened connections at the reading"
  ROWS+=("| $(describe "$t") | $opened | $failed | $held1 | $(mib "$before") | $(mib "$after") | **$per** | $(printf '%s / ' "${closed_rss[@]}" | sed 's| / $||') | $(mib "$peak") |")
  echo "${ROWS[-1]}" >&2
  ((opened < CONNS)) && ROWS_SHORT=1

  stop_pid "$TARGET_PID"; forget "$TARGET_PID"
done

# --- report ------------------------------------------------------------------------

cpu_model="$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)"
git_rev="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
if [[ -n "$(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null || true)" ]]; then
  git_rev="$git_rev (with uncommitted changes)"
fi
report="$TMP/report.md"
{
  echo "# Memory per idle keep-alive connection"
  echo
  echo "- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  echo "- kernel: $(uname -r) ($(uname -m)); nproc: $(nproc); CPU: ${cpu_model:-$(uname -m)}"
  echo "- pointsman: $git_rev; $(haproxy -v 2>/dev/null | head -1 | awk '{print "HAProxy " $3}'); $(nginx -v 2>&1 | sed 's|nginx version: nginx/|nginx |')"
  echo "- command: \`CONNS=$CONNS TARGETS=$(printf '%q' "$TARGETS") THREADS=$THREADS PARALLEL=$PARALLEL SETTLE=$SETTLE CYCLES=$CYCLES $CMDLINE\`; open-files limit $NOFILE"
  echo "- each connection sends one \`GET /\` (HTTP/1.1 keep-alive), reads the response and stays idle;"
  echo "  RSS (VmRSS, proxy process(es)) after a 2 s warm-up and then ${SETTLE} s after the last connection became idle."
  echo "- KiB per connection = (RSS with the connections - RSS before) / connections established at the reading (ss), first cycle. Kernel socket buffers are not in RSS."
  echo "- $CYCLES cycles of open, hold, close: RSS after closing shows how much memory is kept once the connections are gone, and whether it grows cycle after cycle."
  echo
  echo "| target | idle conns | failed | established (ss) | RSS before MiB | RSS with idle conns MiB | KiB per idle conn | RSS after closing them, each cycle MiB | peak RSS MiB |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
  printf '%s\n' "${ROWS[@]}"
  if ((ROWS_SHORT)); then
    echo
    echo "Fewer than $CONNS connections: HAProxy and nginx need two descriptors per connection (client and server side, reserved up front), and the open-files limit here is $NOFILE (raise it, as root with CAP_SYS_RESOURCE, for the full count)."
  fi
} >"$report"
mkdir -p "$(dirname "$RESULTS")"
cp "$report" "$RESULTS"
echo
cat "$report"
echo
log "written to $RESULTS"
