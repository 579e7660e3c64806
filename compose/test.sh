#!/usr/bin/env bash
# Zero-downtime scenarios across the real compose stack: three etcd members,
# lb0 and lb1, api0-api2 under `pointsman register`, and five hey clients
# as the load: 200 connections over both proxies, each sending at most
# CLIENT_RATE (5) requests a second, so that on a two-core host the load
# leaves etcd the CPU it needs to keep its leader. Every
# scenario counts each non-2xx answer and each client error; a scenario
# passes with zero of them and its own checks met.
#
# usage: compose/test.sh PATH-TO-POINTSMAN-BINARY   (make compose-test)
# The images must exist (compose/offline-images.sh). Needs a Docker engine:
# without one it fails saying so.
set -uo pipefail
cd "$(dirname "$0")/.."

bin=$(realpath "${1:?usage: compose/test.sh PATH-TO-POINTSMAN-BINARY}")
compose=compose/compose.sh
etcd=http://127.0.0.1:2379,http://127.0.0.1:2479,http://127.0.0.1:2579
clients=(client0 client1 client2 client3 client4)
# The stack's admin token: `deploy` needs it for drain notices.
export POINTSMAN_ADMIN_TOKEN=${POINTSMAN_ADMIN_TOKEN:-compose-stack-token}
passed=0
failed=0
failures=()

docker info >/dev/null 2>&1 || {
  echo "compose-test: a running Docker engine is needed (docker info failed)" >&2
  echo "0 passed, 1 failed"
  exit 1
}

log() { printf '[%s] %s\n' "$(date +%T)" "$*"; }

teardown() {
  if [ "${KEEP_STACK:-0}" != 1 ]; then
    $compose --profile clients down -v --remove-orphans >/dev/null 2>&1 || true
  fi
}
trap teardown EXIT

# Waits up to $1 seconds for the command after it to succeed.
wait_for() {
  local deadline=$((SECONDS + $1))
  shift
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || return 1
    sleep 0.5
  done
}

# The instance names that answer through a proxy port in 60 requests.
answers() {
  for _ in $(seq 60); do curl -s --max-time 2 "http://127.0.0.1:$1/"; echo; done |
    sed -n 's/.*"server" *: *"\([^"]*\)".*/\1/p' | sort | uniq -c
}

# Both proxies answer from every one of api0-api2.
all_three_serve() {
  local port out
  for port in 5000 5001; do
    out=$(answers $port)
    for id in api0 api1 api2; do grep -q " $id " <<<"$out" || return 1; done
  done
}

# Whether lb ($1's admin port) lists instance $2 of service api.
lists() {
  curl -s --max-time 2 "http://127.0.0.1:$1/api/services" |
    python3 -c 'import json,sys; s=[x for x in json.load(sys.stdin) if x["name"]=="api"]; sys.exit(0 if s and any(e["id"]==sys.argv[1] for e in s[0]["endpoints"]) else 1)' "$2"
}
lists_not() { ! lists "$@"; }

# The etcd source's `connected` in lb ($1's admin port) /api/discovery.
etcd_connected() {
  curl -s --max-time 2 "http://127.0.0.1:$1/api/discovery" |
    python3 -c 'import json,sys; s=[x for x in json.load(sys.stdin) if x["source"]=="etcd"]; sys.exit(0 if s and s[0]["connected"] is (sys.argv[1]=="true") else 1)' "$2"
}

etcdctl_() { ETCDCTL_API=3 etcdctl --endpoints="$etcd" --command-timeout=5s "$@"; }

# Whether proxy $1's record is in etcd.
has_record() { etcdctl_ get --print-value-only "/pointsman/proxies/$1" | grep -q .; }
no_record() { ! has_record "$@"; }

# "STATE NOTICE" of instance $2 of service api on lb ($1's admin port).
state_of() {
  curl -s --max-time 2 "http://127.0.0.1:$1/api/services" |
    python3 -c 'import json,sys; e=[e for x in json.load(sys.stdin) if x["name"]=="api" for e in x["endpoints"] if e["id"]==sys.argv[1]]; print(e[0]["state"], e[0].get("drain_notice")) if e else print("absent")' "$2"
}

# Starts the five clients: 40 connections each, until stopped.
load_start() {
  CLIENT_DURATION=600s CLIENT_CONCURRENCY=40 CLIENT_RATE=${CLIENT_RATE:-5} $compose --profile clients up -d --no-deps "${clients[@]}" >/dev/null 2>&1
  sleep 3 # let every client open its connections before the scenario acts
}

# Stops the clients (hey reports on SIGINT) and prints "ok errors".
load_stop() {
  local ok=0 bad=0 id out n
  for c in "${clients[@]}"; do
    id=$($compose ps -q "$c")
    docker kill -s INT "$id" >/dev/null 2>&1
  done
  for c in "${clients[@]}"; do
    id=$($compose ps -q "$c")
    # hey reports and exits on SIGINT; a busy one may miss the first.
    for _ in 1 2 3 4 5; do
      [ "$(docker inspect -f '{{.State.Running}}' "$id")" = true ] || break
      sleep 2
      docker kill -s INT "$id" >/dev/null 2>&1
    done
    docker wait "$id" >/dev/null
    out=$(docker logs "$id" 2>&1)
    # "  [200]	1234 responses" under "Status code distribution";
    # "  [12]	Get ...: error" under "Error distribution".
    n=$(awk '/Status code distribution/{s=1;next} /Error distribution/{s=0;e=1;next}
             s && /\[2[0-9][0-9]\]/ {ok+=$2} s && /\[[0-9]+\]/ && !/\[2[0-9][0-9]\]/ {bad+=$2}
             e && /^ *\[[0-9]+\]/ {gsub(/[\[\]]/,"",$1); bad+=$1}
             END {print ok+0, bad+0}' <<<"$out")
    ok=$((ok + ${n% *}))
    bad=$((bad + ${n#* }))
    [ "${n#* }" = 0 ] || { echo "--- $c"; grep -A20 -E "Status code|Error distribution" <<<"$out" | head -30; } >&2
  done
  $compose --profile clients rm -fs "${clients[@]}" >/dev/null 2>&1
  echo "$ok $bad"
}

# scenario NAME FUNCTION: runs FUNCTION under load; FUNCTION returns non-zero
# when one of its own checks failed.
scenario() {
  local name=$1 fn=$2 counts ok bad check
  log "scenario: $name"
  load_start
  $fn
  check=$?
  counts=$(load_stop)
  ok=${counts% *}
  bad=${counts#* }
  if [ "$check" = 0 ] && [ "$bad" = 0 ] && [ "$ok" -gt 0 ]; then
    passed=$((passed + 1))
    log "PASS $name: $ok requests, 0 failed"
  else
    failed=$((failed + 1))
    failures+=("$name")
    log "FAIL $name: $ok requests answered 2xx, $bad failed, own checks $([ "$check" = 0 ] && echo passed || echo failed)"
  fi
}

rolling_v2() {
  APP_VERSION=v2 "$bin" deploy --etcd "$etcd" rolling --service api \
    --stop-cmd "$compose stop {id}" \
    --start-cmd "env APP_VERSION=v2 $compose up -d --no-deps {id}" \
    --drain-timeout 30s --health-timeout 90s || { log "deploy rolling failed"; return 1; }
  local port
  for port in 5000 5001; do
    answers $port | grep -v ' v2$' | grep -q . && { log "lb on $port still answers v1"; answers $port; return 1; }
  done
  return 0
}

stop_and_kill() {
  $compose stop api1 >/dev/null 2>&1 || { log "stop api1 failed"; return 1; }
  wait_for 30 lists_not 8404 api1 || { log "lb0 still lists api1 after its stop"; return 1; }
  $compose kill api2 >/dev/null 2>&1 || { log "kill api2 failed"; return 1; }
  # SIGKILL: nobody deregisters; the lease (10 s) takes it out of routing.
  wait_for 40 lists_not 8404 api2 || { log "lb0 still lists api2 after its kill"; return 1; }
  wait_for 10 lists_not 8405 api2 || { log "lb1 still lists api2 after its kill"; return 1; }
  APP_VERSION=v2 $compose up -d --no-deps api1 api2 >/dev/null 2>&1
  wait_for 60 lists 8404 api1 && wait_for 60 lists 8404 api2 && wait_for 30 lists 8405 api2 ||
    { log "api1/api2 did not come back"; return 1; }
}

partition_lb1() {
  local net
  net=$(docker network ls -q --filter name=pointsman_control)
  docker network disconnect "$net" "$($compose ps -q lb1)" || return 1
  local cut_at=$SECONDS status=0
  wait_for 20 etcd_connected 8405 false || { log "lb1 does not report the lost registry"; status=1; }
  # A change made while lb1 is cut off: it must follow it after the cut.
  etcdctl_ put /services/api/extra api0:4000 >/dev/null
  wait_for 10 lists 8404 extra || { log "lb0 did not follow the change"; status=1; }
  lists 8405 extra && { log "lb1 followed a change while cut off from etcd?"; status=1; }
  while [ $((SECONDS - cut_at)) -lt 20 ]; do
    curl -fs --max-time 2 http://127.0.0.1:5001/ >/dev/null || { log "lb1 stopped serving while cut off"; status=1; break; }
    sleep 1
  done
  docker network connect "$net" "$($compose ps -q lb1)" || return 1
  wait_for 30 lists 8405 extra || { log "lb1 did not catch up after the reconnect"; status=1; }
  wait_for 10 etcd_connected 8405 true || { log "lb1 does not report the registry back"; status=1; }
  etcdctl_ del /services/api/extra >/dev/null
  wait_for 10 lists_not 8405 extra || status=1
  return $status
}

# A deploy step while lb1 is cut off from etcd and its record has expired:
# api1's sidekick still asks lb1 (over the apps network), tells it of the
# drain, and stops the app only once lb1 has nothing in flight to it.
stop_api1_while_lb1_cut() {
  local net status=0 id since code log
  net=$(docker network ls -q --filter name=pointsman_control)
  docker network disconnect "$net" "$($compose ps -q lb1)" || return 1
  wait_for 20 etcd_connected 8405 false || { log "lb1 does not report the lost registry"; status=1; }
  wait_for 30 no_record lb1 || { log "lb1's record did not expire"; status=1; }
  id=$($compose ps -q api1)
  since=$(date +%s)
  $compose stop api1 >/dev/null 2>&1 || { log "stop api1 failed"; status=1; }
  code=$(docker inspect -f '{{.State.ExitCode}}' "$id")
  log=$(docker logs --since "$since" "$id" 2>&1)
  if ! grep -q "2 of 2 proxies confirmed" <<<"$log" || grep -q "not confirmed" <<<"$log" || [ "$code" = 75 ] || [ "$code" = 137 ]; then
    log "api1's sidekick did not confirm the drain on both proxies (exit $code):"
    grep -E "drain|confirm|proxies" <<<"$log" | tail -8
    status=1
  fi
  case $(state_of 8405 api1) in
    "drain "[0-9]*) ;;
    *) log "lb1 does not hold api1 in drain on a notice: $(state_of 8405 api1)"; status=1 ;;
  esac
  docker network connect "$net" "$($compose ps -q lb1)" || return 1
  wait_for 30 lists_not 8405 api1 || { log "lb1 still lists api1 after the reconnect: $(state_of 8405 api1)"; status=1; }
  wait_for 30 has_record lb1 || { log "lb1's record did not come back"; status=1; }
  APP_VERSION=v2 $compose up -d --no-deps api1 >/dev/null 2>&1
  wait_for 60 lists 8404 api1 && wait_for 60 lists 8405 api1 || { log "api1 did not come back"; status=1; }
  return $status
}

kill_etcd1() {
  $compose kill etcd1 >/dev/null 2>&1 || return 1
  # If etcd1 led, the other two elect a leader first (election timeout
  # 2.5 s, longer on a busy host): the write must be taken within 20 s.
  wait_for 20 etcdctl_ put /services/api/extra2 api1:4000 || { log "etcd refused a write with two members up for 20 s"; return 1; }
  wait_for 20 lists 8404 extra2 && wait_for 20 lists 8405 extra2 ||
    { log "a proxy stopped following etcd with etcd1 gone"; return 1; }
  etcdctl_ del /services/api/extra2 >/dev/null
  wait_for 20 lists_not 8404 extra2 && wait_for 20 lists_not 8405 extra2 || return 1
  $compose start etcd1 >/dev/null 2>&1
}

log "starting the stack"
$compose --profile clients down -v --remove-orphans >/dev/null 2>&1
$compose up -d >/dev/null || { echo "0 passed, 1 failed"; exit 1; }
if wait_for 120 all_three_serve; then
  passed=$((passed + 1))
  log "PASS the stack is up: both proxies serve api0, api1 and api2"
  for port in 5000 5001; do log "lb on $port:"; answers $port; done
else
  failed=$((failed + 1))
  failures+=("stack up")
  log "FAIL the stack did not come up"
  $compose ps
  $compose logs --tail=30 lb0 api0
  echo "$passed passed, $failed failed"
  exit 1
fi

scenario "rolling deploy v1 -> v2" rolling_v2
scenario "stop api1 (SIGTERM), kill api2 (SIGKILL)" stop_and_kill
scenario "lb1 cut off from etcd for 20 s" partition_lb1
scenario "stop api1 while lb1 is cut off from etcd" stop_api1_while_lb1_cut
scenario "kill etcd1" kill_etcd1

[ ${#failures[@]} = 0 ] || log "failed: ${failures[*]}"
echo "compose: $passed passed, $failed failed"
[ "$failed" = 0 ]
