#!/usr/bin/env bash
# Throughput, latency, CPU and memory of pointsman next to HAProxy and nginx,
# all in front of the same nginx backend on 127.0.0.1.
#
#   cargo build --release && bash bench/run.sh
#
# Environment:
#   DURATION=10s        length of each measured wrk run (QUICK=1: 2s)
#   WARMUP=2s           unmeasured wrk run before each measurement (QUICK=1: 1s)
#   QUICK=1             short runs, to check the harness
#   TARGETS="direct haproxy1 haproxy2 nginx pointsman1 pointsman2"
#   MODES="keepalive close"
#   ROUNDS=1            rounds over all targets; the table shows medians
#   CONNS=64            wrk connections, keep-alive runs
#   CLOSE_CONNS=16      wrk connections, connection-per-request runs
#   WRK_THREADS=1       wrk threads (-t)
#   POINTSMAN_BIN=...   default: target/release/pointsman (copied before the run)
#   POINTSMAN_TABLE=large  pointsman's table also holds 1,000 routes and 10,000
#                       endpoints (default: small, one service)
#   RESULTS=...         default: bench/results/latest.md
#   KEEP_TMP=1          keep the temp dir (configs, logs, raw wrk output)
#
# Every process is started here, in the foreground, with configs, pid files
# and logs in a temp dir; the system's nginx and haproxy services are not
# touched. Everything started is stopped on exit.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CMDLINE="$(printf '%q ' "$0" "$@")"
CMDLINE="${CMDLINE% }"

QUICK="${QUICK:-0}"
if [[ "$QUICK" == 1 ]]; then
  DURATION="${DURATION:-2s}"
  WARMUP="${WARMUP:-1s}"
else
  DURATION="${DURATION:-10s}"
  WARMUP="${WARMUP:-2s}"
fi
TARGETS="${TARGETS:-direct haproxy1 haproxy2 nginx pointsman1 pointsman2}"
ROUNDS="${ROUNDS:-1}"
MODES="${MODES:-keepalive close}"
CONNS="${CONNS:-64}"
CLOSE_CONNS="${CLOSE_CONNS:-16}"
WRK_THREADS="${WRK_THREADS:-1}"
POINTSMAN_BIN="${POINTSMAN_BIN:-$ROOT/target/release/pointsman}"
RESULTS="${RESULTS:-$ROOT/bench/results/latest.md}"
KEEP_TMP="${KEEP_TMP:-0}"

die() { echo "bench: $*" >&2; exit 1; }
log() { echo "bench: $*" >&2; }

# --- prerequisites -----------------------------------------------------------

for t in $TARGETS; do
  case "$t" in
    direct|haproxy1|haproxy2|nginx|pointsman1|pointsman2) ;;
    *) die "unknown target '$t' (known: direct haproxy1 haproxy2 nginx pointsman1 pointsman2)" ;;
  esac
done
[[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a positive integer"
for m in $MODES; do
  case "$m" in keepalive|close) ;; *) die "unknown mode '$m' (known: keepalive close)" ;; esac
done
need() { command -v "$1" >/dev/null 2>&1 || die "$1 not found (apt-get install -y $2)"; }
need wrk wrk
need nginx nginx
need python3 python3
[[ " $TARGETS " == *" haproxy"* ]] && need haproxy haproxy
if [[ " $TARGETS " == *" pointsman"* ]]; then
  [[ -x "$POINTSMAN_BIN" ]] || die "$POINTSMAN_BIN not found: run 'cargo build --release' first"
fi
[[ -r /proc/self/stat ]] || die "needs /proc (Linux)"

# Enough descriptors for the proxies (they inherit it).
# (A container without CAP_SYS_RESOURCE keeps its hard limit: use that.)
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
NOFILE="$(ulimit -n)"
[[ "$NOFILE" == unlimited ]] && NOFILE=65536
CLK_TCK="$(getconf CLK_TCK)"

# --- temp dir, process bookkeeping, cleanup ------------------------------------

TMP="$(mktemp -d "${TMPDIR:-/tmp}/pointsman-bench.XXXXXX")"
chmod 755 "$TMP" # nginx workers (user nobody when started as root) may need to reach it
# Paths given relative to where we were started, then work inside $TMP.
POINTSMAN_BIN="$(realpath -m "$POINTSMAN_BIN")"
RESULTS="$(realpath -m "$RESULTS")"
cd "$TMP"
PIDS=()

stop_pid() { # pid: TERM, wait up to 5 s, then KILL
  local pid="$1" i
  kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 50; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    # nginx workers are our grandchildren: take them along.
    local kids
    kids="$(children_of "$pid")"
    # shellcheck disable=SC2086 # one word per pid
    kill -KILL "$pid" $kids 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
}

cleanup() {
  local rc=$? pid
  trap - EXIT INT TERM
  for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
  if [[ "$KEEP_TMP" == 1 ]]; then
    log "temp dir kept: $TMP"
  else
    rm -rf "$TMP"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

start() { # name cmd...: start in the background, log to $TMP/name.log, set LAST_PID
  local name="$1"; shift
  "$@" >"$TMP/$name.log" 2>&1 &
  LAST_PID=$!
  PIDS+=("$LAST_PID")
}

forget() { # pid: no longer ours to stop
  local p keep=()
  for p in "${PIDS[@]}"; do [[ "$p" == "$1" ]] || keep+=("$p"); done
  PIDS=("${keep[@]+"${keep[@]}"}")
}

stop() { # pid
  stop_pid "$1"
  forget "$1"
}

free_ports() { # n: n distinct free TCP ports on 127.0.0.1
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

wait_http() { # name pid url: wait (10 s) until url answers "hello"
  local name="$1" pid="$2" url="$3" i body
  for ((i = 0; i < 100; i++)); do
    kill -0 "$pid" 2>/dev/null || { cat "$TMP/$name.log" >&2; die "$name exited at start"; }
    body="$(curl_get "$url" 2>/dev/null || true)"
    [[ "$body" == hello* ]] && return 0
    sleep 0.1
  done
  cat "$TMP/$name.log" >&2
  die "$name did not answer on $url"
}

curl_get() {
  if command -v curl >/dev/null 2>&1; then
    curl -fsS --max-time 2 "$1"
  else
    python3 -c 'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=2).read().decode())' "$1"
  fi
}

# --- /proc accounting -----------------------------------------------------------

children_of() { # pid: its direct children
  cat /proc/"$1"/task/*/children 2>/dev/null | tr ' ' '\n' | sed '/^$/d' | sort -u | tr '\n' ' '
}

proc_tree() { # pid: pid and its children (nginx master + workers)
  echo "$1 $(children_of "$1")"
}

cpu_ticks() { # pids...: utime+stime summed (clock ticks)
  local pid total=0 stat rest
  for pid in "$@"; do
    stat="$(cat /proc/"$pid"/stat 2>/dev/null)" || continue
    rest="${stat##*) }" # fields from 3 (state) on; comm may contain spaces
    read -r -a f <<<"$rest"
    total=$((total + f[11] + f[12])) # fields 14 and 15
  done
  echo "$total"
}

hwm_kib() { # pids...: VmHWM summed (KiB)
  local pid total=0 v
  for pid in "$@"; do
    v="$(awk '/^VmHWM:/ {print $2}' /proc/"$pid"/status 2>/dev/null || true)"
    total=$((total + ${v:-0}))
  done
  echo "$total"
}

# --- wrk ------------------------------------------------------------------------

to_ms() { # wrk duration (123.00us, 1.23ms, 1.02s, 1.00m) -> ms
  awk -v d="$1" 'BEGIN {
    if (match(d, /^[0-9.]+/)) { n = substr(d, 1, RLENGTH); u = substr(d, RLENGTH + 1) } else { print "?"; exit }
    f = (u == "us") ? 0.001 : (u == "ms") ? 1 : (u == "s") ? 1000 : (u == "m") ? 60000 : (u == "h") ? 3600000 : -1
    if (f < 0) { print "?"; exit }
    v = n * f
    printf (v < 10 ? "%.3f" : "%.1f"), v
  }'
}

fmt_ms() { # ms -> 3 decimals below 10, else 1
  awk -v v="$1" 'BEGIN { if (v == "—" || v == "?") print v; else printf (v < 10 ? "%.3f" : "%.1f"), v }'
}

wrk_cmd_display() { # mode duration url
  if [[ "$1" == keepalive ]]; then
    echo "wrk -t$WRK_THREADS -c$CONNS -d$2 --latency $3"
  else
    echo "wrk -t$WRK_THREADS -c$CLOSE_CONNS -d$2 --latency -H 'Connection: close' $3"
  fi
}

run_wrk() { # mode duration url outfile
  local mode="$1" dur="$2" url="$3" out="$4" rc=0
  # In the background and waited for, so that a signal stops the run at once
  # (and cleanup stops wrk too).
  if [[ "$mode" == keepalive ]]; then
    start wrk wrk -t"$WRK_THREADS" -c"$CONNS" -d"$dur" --latency "$url"
  else
    start wrk wrk -t"$WRK_THREADS" -c"$CLOSE_CONNS" -d"$dur" --latency -H 'Connection: close' "$url"
  fi
  wait "$LAST_PID" || rc=$?
  forget "$LAST_PID"
  mv "$TMP/wrk.log" "$out"
  return "$rc"
}

# --- configs --------------------------------------------------------------------

read -r BACKEND_PORT PROXY_PORT ADMIN_PORT <<<"$(free_ports 3)"
BACKEND="127.0.0.1:$BACKEND_PORT"
URL="http://127.0.0.1:$PROXY_PORT/"

nginx_common() { # name: the top of an nginx config with every path in $TMP
  cat <<EOF
worker_processes 1;
pid $TMP/$1.pid;
error_log $TMP/$1.error.log warn;
events { worker_connections 4096; multi_accept on; }
EOF
}

nginx_http_paths() { # name
  cat <<EOF
    access_log off;
    client_body_temp_path $TMP/$1-body;
    proxy_temp_path $TMP/$1-proxy;
    fastcgi_temp_path $TMP/$1-fastcgi;
    uwsgi_temp_path $TMP/$1-uwsgi;
    scgi_temp_path $TMP/$1-scgi;
EOF
}

write_backend_conf() {
  {
    nginx_common backend
    echo "worker_rlimit_nofile $NOFILE;"
    echo "http {"
    nginx_http_paths backend
    cat <<EOF
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    server {
        listen $BACKEND backlog=4096;
        location / {
            default_type text/plain;
            return 200 "hello\n";
        }
        # connections accepted, to see how well the proxies reuse theirs
        location = /__bench_status {
            stub_status;
        }
    }
}
EOF
  } >"$TMP/backend.conf"
}

write_nginx_proxy_conf() {
  {
    nginx_common nginxproxy
    echo "worker_rlimit_nofile $NOFILE;"
    echo "http {"
    nginx_http_paths nginxproxy
    cat <<EOF
    keepalive_requests 10000000;
    keepalive_timeout 60s;
    upstream backend {
        server $BACKEND;
        keepalive 64;
        keepalive_requests 10000000;
        keepalive_timeout 30s;
    }
    server {
        listen 127.0.0.1:$PROXY_PORT backlog=4096;
        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            # what pointsman does to every request, for the same work
            proxy_set_header Host \$http_host;
            proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto \$scheme;
            proxy_set_header X-Forwarded-Host \$http_host;
        }
    }
}
EOF
  } >"$TMP/nginxproxy.conf"
}

write_haproxy_conf() { # nbthread
  cat >"$TMP/haproxy$1.cfg" <<EOF
global
    nbthread $1
    maxconn 4096
    pidfile $TMP/haproxy$1.pid

defaults
    mode http
    option http-keep-alive
    # "always": like nginx's and pointsman's pools, a request may use any idle
    # server connection (the default "safe" opens a new one for the first
    # request of every client connection, which the close runs would measure)
    http-reuse always
    timeout connect 3s
    timeout client 60s
    timeout server 60s
    timeout http-request 10s
    timeout http-keep-alive 60s
    maxconn 4096

frontend fe
    bind 127.0.0.1:$PROXY_PORT
    # what pointsman does to every request, for the same work
    option forwardfor
    http-request set-header X-Forwarded-Proto http
    http-request set-header X-Forwarded-Host %[req.hdr(host)]
    default_backend be

backend be
    server nginx $BACKEND
EOF
}

write_pointsman_conf() {
  cat >"$TMP/pointsman.toml" <<EOF
[global]
admin = "127.0.0.1:$ADMIN_PORT"
drain_timeout = "1s"
max_connections = 4096

[[listeners]]
name = "web"
bind = "127.0.0.1:$PROXY_PORT"
default_service = "backend"

[services.backend]
endpoints = [{ id = "nginx", address = "$BACKEND" }]
EOF
  if [[ "${POINTSMAN_TABLE:-small}" == large ]]; then
    # The same traffic through a table of 1,000 host routes and 1,000
    # services of 10 endpoints each (never contacted), plus a catch-all
    # route, so every request goes through route matching.
    {
      printf '[routes.all]\nservice = "backend"\n'
      for ((i = 0; i < 1000; i++)); do
        printf '[routes.r%d]\nhost = "h%d.example.com"\nservice = "s%d"\n' "$i" "$i" "$i"
        printf '[services.s%d]\nendpoints = [' "$i"
        for ((j = 0; j < 10; j++)); do
          printf '{ id = "e%d", address = "127.0.0.2:%d" },' "$j" "$((10000 + i * 10 + j))"
        done
        printf ']\n'
      done
    } >>"$TMP/pointsman.toml"
  fi
}

# --- one target --------------------------------------------------------------------

declare -A RPS P50 P99 ERRS PCPU BCPU RSS UCONN OTHER

machine_ticks() { # busy and total clock ticks of all CPUs
  # busy: user, nice, system and steal (time the hypervisor gave to others).
  # Not irq and softirq: the kernel's loopback TCP work for our own traffic
  # lands there without being charged to any process.
  awk '$1 == "cpu" { busy = $2 + $3 + $4 + $9; print busy, busy + $5 + $6 + $7 + $8; exit }' /proc/stat
}

backend_accepts() { # connections the backend has accepted so far
  curl_get "http://$BACKEND/__bench_status" | awk 'NR == 3 {print $1}'
}

TARGET_PID=""    # the proxy's (main) pid; empty for direct
TARGET_URL=""

start_target() { # target
  local t="$1"
  TARGET_PID=""
  TARGET_URL="$URL"
  case "$t" in
    direct)
      TARGET_URL="http://$BACKEND/"
      return 0
      ;;
    haproxy1|haproxy2)
      local n="${t#haproxy}"
      write_haproxy_conf "$n"
      haproxy -c -q -f "$TMP/haproxy$n.cfg" >"$TMP/$t.check.log" 2>&1 ||
        { cat "$TMP/$t.check.log" >&2; die "haproxy config check failed"; }
      start "$t" haproxy -f "$TMP/haproxy$n.cfg" -db
      ;;
    nginx)
      write_nginx_proxy_conf
      mkdir -p "$TMP"/nginxproxy-{body,proxy,fastcgi,uwsgi,scgi}
      start "$t" nginx -p "$TMP" -e "$TMP/nginxproxy.error.log" -c "$TMP/nginxproxy.conf" -g 'daemon off;'
      ;;
    pointsman1|pointsman2)
      write_pointsman_conf
      start "$t" env POINTSMAN_LOG=warn "$PSBIN" run --config "$TMP/pointsman.toml" --threads "${t#pointsman}"
      ;;
  esac
  TARGET_PID="$LAST_PID"
  wait_http "$t" "$TARGET_PID" "$TARGET_URL"
}

measure() { # target mode round
  local t="$1" mode="$2" key="$1:$2:$3" out="$TMP/wrk-$1-$2-$3.txt"
  local ppids=() bpids=() p0 p1 b0 b1 a0 a1 reqs s_busy0 s_busy1 s_all0 s_all1
  run_wrk "$mode" "$WARMUP" "$TARGET_URL" "$TMP/wrk-$t-$mode-$3-warmup.txt" ||
    { cat "$TMP/wrk-$t-$mode-$3-warmup.txt" >&2; die "wrk warm-up failed for $t"; }
  read -r -a bpids <<<"$(proc_tree "$BACKEND_PID")"
  [[ -n "$TARGET_PID" ]] && read -r -a ppids <<<"$(proc_tree "$TARGET_PID")"
  a0="$(backend_accepts)"
  b0="$(cpu_ticks "${bpids[@]}")"
  p0="$(cpu_ticks "${ppids[@]+"${ppids[@]}"}")"
  read -r s_busy0 s_all0 < <(machine_ticks)
  local TIMEFORMAT='%U %S' wrk_cpu
  { time run_wrk "$mode" "$DURATION" "$TARGET_URL" "$out"; } 2>"$out.time" ||
    { cat "$out" >&2; die "wrk failed for $t"; }
  read -r s_busy1 s_all1 < <(machine_ticks)
  b1="$(cpu_ticks "${bpids[@]}")"
  p1="$(cpu_ticks "${ppids[@]+"${ppids[@]}"}")"
  wrk_cpu="$(awk '{ print $1 + $2 }' "$out.time")"
  a1="$(backend_accepts)"
  if [[ -n "$TARGET_PID" ]] && ! kill -0 "$TARGET_PID" 2>/dev/null; then
    cat "$TMP/$t.log" >&2; die "$t died during the run"
  fi

  reqs="$(awk '/ requests in / {print $1; exit}' "$out")"
  [[ -n "$reqs" && "$reqs" -gt 0 ]] || { cat "$out" >&2; die "no requests completed for $t $mode"; }
  RPS[$key]="$(awk '/^Requests\/sec:/ {printf "%.0f", $2; exit}' "$out")"
  P50[$key]="$(to_ms "$(awk '$1 == "50%" {print $2; exit}' "$out")")"
  P99[$key]="$(to_ms "$(awk '$1 == "99%" {print $2; exit}' "$out")")"
  ERRS[$key]="$(awk '
    /Socket errors:/ { gsub(",", ""); s += $4 + $6 + $8 + $10 }
    /Non-2xx or 3xx responses:/ { s += $NF }
    END { print s + 0 }' "$out")"
  per100k() { awk -v d="$1" -v r="$reqs" -v hz="$CLK_TCK" 'BEGIN { printf "%.2f", d / hz / r * 100000 }'; }
  BCPU[$key]="$(per100k $((b1 - b0)))"
  # CPU time of everything else on the machine, as a share of all cores:
  # busy time of all CPUs minus proxy, backend and wrk.
  OTHER[$key]="$(awk -v busy=$((s_busy1 - s_busy0)) -v all=$((s_all1 - s_all0)) -v ours=$(((p1 - p0) + (b1 - b0))) \
    -v w="$wrk_cpu" -v hz="$CLK_TCK" 'BEGIN { o = busy - ours - w * hz; if (o < 0) o = 0; printf "%.0f", (all > 0 ? 100 * o / all : 0) }')"
  # minus the status request itself
  UCONN[$key]="$(awk -v a=$((a1 - a0 - 1)) -v r="$reqs" 'BEGIN { printf "%.1f", a / r * 1000 }')"
  if [[ -n "$TARGET_PID" ]]; then
    PCPU[$key]="$(per100k $((p1 - p0)))"
    read -r -a ppids <<<"$(proc_tree "$TARGET_PID")"
    RSS[$key]="$(awk -v k="$(hwm_kib "${ppids[@]}")" 'BEGIN { printf "%.1f", k / 1024 }')"
  else
    PCPU[$key]="—"
    RSS[$key]="—"
  fi
  log "$(printf 'round %s  %-11s %-9s %8s req/s  p50 %7s ms  p99 %7s ms  other load %s%%  errors %s  backend conns/1k req %s  proxy CPU %s s/100k  backend CPU %s s/100k  RSS %s MiB' \
    "$3" "$t" "$mode" "${RPS[$key]}" "${P50[$key]}" "${P99[$key]}" "${OTHER[$key]}" "${ERRS[$key]}" "${UCONN[$key]}" "${PCPU[$key]}" "${BCPU[$key]}" "${RSS[$key]}")"
}

# --- run ---------------------------------------------------------------------------------

PSBIN=""
if [[ " $TARGETS " == *" pointsman"* ]]; then
  # A private copy: a concurrent `cargo build` must not swap the binary mid-run.
  PSBIN="$TMP/pointsman"
  cp "$POINTSMAN_BIN" "$PSBIN"
fi

LOAD_BEFORE="$(cut -d' ' -f1-3 /proc/loadavg)"
write_backend_conf
mkdir -p "$TMP"/backend-{body,proxy,fastcgi,uwsgi,scgi}
start backend nginx -p "$TMP" -e "$TMP/backend.error.log" -c "$TMP/backend.conf" -g 'daemon off;'
BACKEND_PID="$LAST_PID"
wait_http backend "$BACKEND_PID" "http://$BACKEND/"
log "backend nginx on $BACKEND; targets: $TARGETS; modes: $MODES; $DURATION runs after $WARMUP warm-ups"

# Rounds go through every target in turn, so that a burst of other load on
# the machine hits one round of everyone rather than all runs of one target.
for ((r = 1; r <= ROUNDS; r++)); do
  for t in $TARGETS; do
    start_target "$t"
    for m in $MODES; do measure "$t" "$m" "$r"; done
    if [[ -n "$TARGET_PID" ]]; then stop "$TARGET_PID"; fi
    sleep 0.5
  done
done

median() { # numbers... (or "—")
  printf '%s\n' "$@" | awk '$1 != "—"' | sort -g | awk '
    { v[NR] = $1 } END { if (NR == 0) print "—"; else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
# The figures of a target and mode: medians over the rounds (errors: sum,
# RSS: max), and every round's req/s.
declare -A ALLRPS ALLOTHER
for t in $TARGETS; do
  for m in $MODES; do
    rps=() p50=() p99=() pc=() bc=() rss=() uc=() ot=() errs=0
    for ((r = 1; r <= ROUNDS; r++)); do
      k="$t:$m:$r"
      rps+=("${RPS[$k]}"); p50+=("${P50[$k]}"); p99+=("${P99[$k]}")
      pc+=("${PCPU[$k]}"); bc+=("${BCPU[$k]}"); rss+=("${RSS[$k]}"); uc+=("${UCONN[$k]}"); ot+=("${OTHER[$k]}")
      errs=$((errs + ERRS[$k]))
    done
    k="$t:$m"
    RPS[$k]="$(printf '%.0f' "$(median "${rps[@]}")")"
    P50[$k]="$(fmt_ms "$(median "${p50[@]}")")"
    P99[$k]="$(fmt_ms "$(median "${p99[@]}")")"
    PCPU[$k]="$(median "${pc[@]}")"
    [[ "${PCPU[$k]}" == "—" ]] || PCPU[$k]="$(printf '%.2f' "${PCPU[$k]}")"
    BCPU[$k]="$(printf '%.2f' "$(median "${bc[@]}")")"
    RSS[$k]="$(printf '%s\n' "${rss[@]}" | sort -g | tail -1)"
    ERRS[$k]="$errs"
    UCONN[$k]="$(printf '%.1f' "$(median "${uc[@]}")")"
    ALLRPS[$k]="${rps[*]}"
    ALLOTHER[$k]="${ot[*]}"
    OTHER[$k]="$(printf '%.0f' "$(median "${ot[@]}")")"
  done
done

# --- report --------------------------------------------------------------------------------

describe() {
  case "$1" in
    direct) echo "nginx backend, no proxy" ;;
    haproxy1) echo "HAProxy, nbthread 1" ;;
    haproxy2) echo "HAProxy, nbthread 2" ;;
    nginx) echo "nginx proxy, 1 worker" ;;
    pointsman1) echo "pointsman, --threads 1" ;;
    pointsman2) echo "pointsman, --threads 2" ;;
  esac
}
baseline_of() { # target -> the HAProxy target it is compared with
  case "$1" in
    haproxy1|nginx|pointsman1) echo haproxy1 ;;
    haproxy2|pointsman2) echo haproxy2 ;;
    *) echo "" ;;
  esac
}

LOAD_AFTER="$(cut -d' ' -f1-3 /proc/loadavg)"
cpu_model="$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)"
[[ -n "$cpu_model" ]] || cpu_model="$(uname -m)"
git_rev="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
if [[ -n "$(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null || true)" ]]; then
  git_rev="$git_rev (with uncommitted changes)"
fi
env_line=""
for v in QUICK DURATION WARMUP ROUNDS TARGETS MODES CONNS CLOSE_CONNS WRK_THREADS; do
  env_line+="$v=$(printf '%q' "${!v}") "
done

report="$TMP/report.md"
{
  echo "# pointsman benchmark"
  echo
  echo "- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  echo "- kernel: $(uname -r) ($(uname -m)); nproc: $(nproc); CPU: $cpu_model"
  echo "- pointsman: $git_rev; $(haproxy -v 2>/dev/null | head -1 | awk '{print "HAProxy " $3}'); $(nginx -v 2>&1 | sed 's|nginx version: nginx/|nginx |'); $(wrk --version 2>&1 | head -1 | awk '{print "wrk " $2}')"
  echo "- command: \`$env_line$CMDLINE\`"
  echo "- load: \`$(wrk_cmd_display keepalive "$DURATION" URL)\` (keepalive),"
  echo "  \`$(wrk_cmd_display close "$DURATION" URL)\` (close);"
  echo "  each after an unmeasured $WARMUP run with the same flags. Nothing pinned: wrk, proxy and backend share $(nproc) cores."
  echo "- backend: nginx, 1 worker, \`return 200 \"hello\\n\"\`, keep-alive (keepalive_requests 10000000)."
  echo "- CPU: utime+stime of the proxy (nginx: master and workers) over the measured run, per 100,000 requests;"
  echo "  backend CPU likewise for the nginx backend. RSS: VmHWM (peak) of the proxy process(es) at the end of the run."
  if ((ROUNDS > 1)); then
    echo "- $ROUNDS rounds over all targets; figures are medians over the rounds (errors: sum; RSS: max)."
  fi
  echo "- other load: CPU time used during the run by everything but wrk, the proxy and the backend, in % of all $(nproc) cores. Above a few %, req/s and latency are disturbed; CPU per request much less so."
  echo "- load average (1, 5, 15 min) before the run: $LOAD_BEFORE; after: $LOAD_AFTER (includes the run itself)."
  echo "- backend conns per 1k req: connections the backend accepted during the run (nginx stub_status) per 1,000 requests: 1000 is none reused, near 0 is all reused."
  echo "- vs HAProxy: req/s over HAProxy's with the same thread count in the same mode (nginx proxy vs nbthread 1)."
  echo
  echo "| target | mode | conns | req/s | vs HAProxy | p50 ms | p99 ms | errors | other load % | backend conns per 1k req | proxy CPU s/100k req | backend CPU s/100k req | proxy peak RSS MiB |"
  echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
  for t in $TARGETS; do
    for m in $MODES; do
      k="$t:$m"
      b="$(baseline_of "$t")"
      ratio="—"
      if [[ -n "$b" && -n "${RPS[$b:$m]:-}" ]]; then
        ratio="$(awk -v a="${RPS[$k]}" -v h="${RPS[$b:$m]}" 'BEGIN { printf "%.2f", a / h }')"
      elif [[ -n "$b" ]]; then
        ratio="n/a"
      fi
      conns="$CONNS"; [[ "$m" == close ]] && conns="$CLOSE_CONNS"
      echo "| $(describe "$t") | $m | $conns | ${RPS[$k]} | $ratio | ${P50[$k]} | ${P99[$k]} | ${ERRS[$k]} | ${OTHER[$k]} | ${UCONN[$k]} | ${PCPU[$k]} | ${BCPU[$k]} | ${RSS[$k]} |"
    done
  done
  echo
  if ((ROUNDS > 1)); then
    echo "req/s of each round:"
    echo
    for t in $TARGETS; do
      for m in $MODES; do echo "- $(describe "$t"), $m: ${ALLRPS[$t:$m]} (other load %: ${ALLOTHER[$t:$m]})"; done
    done
    echo
  fi
  echo "errors: wrk socket errors (connect, read, write, timeout) plus non-2xx responses. \"close\" sends \`Connection: close\`, so every request is a new client connection, while a proxy can keep its upstream connections (see backend conns per 1k req)."
} >"$report"

mkdir -p "$(dirname "$RESULTS")"
cp "$report" "$RESULTS"
echo
cat "$report"
echo
log "written to $RESULTS"
