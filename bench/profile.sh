#!/usr/bin/env bash
# Where the server's CPU goes in the three throughput scenarios of issue 20.
#
#   bash bench/profile.sh [SCENARIO...]                 perf, cpu-clock, DWARF call graphs
#   TOOL=callgrind bash bench/profile.sh [SCENARIO...]  instructions per request (valgrind)
#   OUT=/tmp/prof BACKEND=postgres PERF_SECS=8 bash bench/profile.sh whole
#
# Scenarios (default: all three), each on a fresh database with the default
# configuration, wrk 2 threads 64 connections POSTing bench/track.lua:
#   outage  Totango refusing connections (endpoint 127.0.0.1:9): every message
#           is attempted, fails and is rescheduled while ingest runs;
#   ingest  bench/ingest.sh's scenario with delivery idle: the fake Totango never
#           answers in time, so nothing is delivered while wrk runs;
#   whole   the whole path: the fake Totango answers after 100 ms.
#
# perf: records the server process only (`perf record -e cpu-clock -F FREQ
# --call-graph dwarf,32768 -p PID`) for PERF_SECS once the load has run for 2 s, then
# writes to OUT (default: a new temp dir, kept) per scenario: SCENARIO.data,
# SCENARIO.children.txt (every symbol, inclusive and self share), and
# SCENARIO.txt with wrk's result under perf, (BACKEND=postgres) the self time of
# PostgreSQL's own processes recorded at the same time, the top entries by self time and
# by inclusive time (children), and the share of each thread and library.
#
# callgrind: runs the server under `valgrind --tool=callgrind
# --instr-atstart=no`, warms it up with 200 requests, then counts the
# instructions of exactly N (default 2000) requests sent by one keep-alive
# client one after the other (so every request has its own commit: the
# fsync-per-request end of group commit). `healthz` is measured as a fourth
# scenario here, the baseline. For `whole` (fake answering at once) the count
# ends when the fake has received all N, so it includes their delivery; for
# `outage` it ends after the N answers (attempts go on, so the figure moves
# with timing). Writes OUT/SCENARIO.callgrind and OUT/SCENARIO.txt (Ir per
# request, top functions inclusive and self).
set -euo pipefail
cd "$(dirname "$0")/.."
TOOL=${TOOL:-perf}
BACKEND=${BACKEND:-sqlite}
PERF_SECS=${PERF_SECS:-8}
FREQ=${FREQ:-999}
CALL_GRAPH=${CALL_GRAPH:-dwarf,32768}
DURATION=${DURATION:-$((PERF_SECS + 4))s}
N=${N:-2000}
SERVER_PORT=${SERVER_PORT:-18390}
FAKE_PORT=${FAKE_PORT:-18391}
TOP=${TOP:-30}
# Frames every sample passes through, left out of the inclusive list.
GENERIC_FRAMES='\(inlined\)|0xffffffffffffffff|start_thread|clone3|thread_start|call_once|catch_unwind|do_call|__rust_begin_short_backtrace|tokio::runtime|entry_SYSCALL|do_syscall_64|std::thread|tokio::task|Oneshot<S,Req>|RouteFuture|from_fn::ResponseFuture|future::map::Map<|MapIntoResponseFuture|Dispatcher<D,Bs,I,T>::poll_loop|Dispatcher<D,Bs,I,T>::poll_inner|hyper_util::server::conn::auto|tokio::runtime'
source bench/lib.sh

scenarios=("$@")
if [ ${#scenarios[@]} -eq 0 ]; then
  scenarios=(outage ingest whole)
  [ "$TOOL" = callgrind ] && scenarios=(healthz outage ingest whole)
fi
case $TOOL in
  perf) need_tools perf wrk curl ;;
  callgrind) need_tools valgrind callgrind_control callgrind_annotate python3 curl ;;
  *) echo "TOOL=perf or TOOL=callgrind" >&2; exit 2 ;;
esac
[ "$BACKEND" = postgres ] && need_tools psql
[ -n "${SKIP_BUILD:-}" ] || cargo build --release --quiet --bin totango-destination --example fake_totango
OUT=${OUT:-$(mktemp -d /tmp/td-profile.XXXXXX)}
mkdir -p "$OUT"
work=$(mktemp -d)
bench_traps

# start SCENARIO: the fake (if any) and the server for it.
start() {
  local endpoint="http://127.0.0.1:$FAKE_PORT"
  fresh_storage "$BACKEND"
  case $1 in
    outage) endpoint=http://127.0.0.1:9 ;;
    ingest) start_fake "$FAKE_PORT" 3600000 ;;
    whole) start_fake "$FAKE_PORT" "$([ "$TOOL" = callgrind ] && echo 0 || echo 100)" ;;
    healthz) start_fake "$FAKE_PORT" 0 ;;
    *) echo "unknown scenario $1 (outage, ingest, whole, healthz)" >&2; exit 2 ;;
  esac
  start_server "$SERVER_PORT" "$storage_url" "$endpoint"
}

perf_scenario() {
  local s=$1 wrk_pid report="$OUT/$1.txt"
  start "$s"
  RUN="profile-$s-$$" wrk -t2 -c64 -d"$DURATION" --latency -s bench/track.lua \
    "http://127.0.0.1:$SERVER_PORT" >"$work/wrk.txt" 2>&1 &
  wrk_pid=$!
  sleep 2
  local pg_perf=""
  if [ "$BACKEND" = postgres ] && [ -n "$(pgrep -x postgres)" ]; then
    # PostgreSQL's processes (its backends serving this server, and any other
    # client's), self time only: its binary has no DWARF here.
    perf record -q -e cpu-clock -F "$FREQ" -p "$(pgrep -d, -x postgres)" \
      -o "$OUT/$s.postgres.data" -- sleep "$PERF_SECS" 2>>"$work/perf.log" &
    pg_perf=$!
  fi
  perf record -q -e cpu-clock -F "$FREQ" --call-graph "$CALL_GRAPH" -p "$bench_server_pid" \
    -o "$OUT/$s.data" -- sleep "$PERF_SECS" 2>>"$work/perf.log"
  [ -n "$pg_perf" ] && wait "$pg_perf"
  wait "$wrk_pid"
  perf report --no-inline -i "$OUT/$s.data" --stdio --children --sort symbol -g none 2>/dev/null |
    grep -E '^ +[0-9]' | sed -E 's/ +-? *$//' >"$OUT/$s.children.txt"
  {
    echo "== $s ($BACKEND): wrk under perf"
    grep -E 'Requests/sec|requests in|Non-2xx|  99%' "$work/wrk.txt" || true
    echo "accepted: $(metric "$SERVER_PORT" td_messages_accepted_total); attempts: $(metric "$SERVER_PORT" td_delivery_attempts_total); delivered: $(metric "$SERVER_PORT" td_messages_total 'outcome="delivered"')"
    echo
    perf report --no-inline -i "$OUT/$s.data" --stdio --sort comm -g none 2>/dev/null | grep -m1 '^# Samples'
    echo "== threads (share of the server's samples)"
    perf report --no-inline -i "$OUT/$s.data" --stdio --no-children --sort comm -g none --percent-limit 1 2>/dev/null | grep -E '^ +[0-9]'
    echo
    echo "== libraries"
    perf report --no-inline -i "$OUT/$s.data" --stdio --no-children --sort dso -g none --percent-limit 1 2>/dev/null | grep -E '^ +[0-9]'
    echo
    echo "== top $TOP by self time"
    perf report --no-inline -i "$OUT/$s.data" --stdio --no-children --sort symbol -g none 2>/dev/null | grep -E '^ +[0-9]' | awk -v n="$TOP" 'NR <= n'
    echo
    if [ -n "$pg_perf" ]; then
      echo "== PostgreSQL's processes: samples beside the server's, and top $TOP by self time"
      perf report --no-inline -i "$OUT/$s.postgres.data" --stdio --sort comm -g none 2>/dev/null | grep -m1 '^# Samples'
      perf report --no-inline -i "$OUT/$s.postgres.data" --stdio --sort dso -g none --percent-limit 2 2>/dev/null | grep -E '^ +[0-9]'
      perf report --no-inline -i "$OUT/$s.postgres.data" --stdio --sort symbol -g none 2>/dev/null | grep -E '^ +[0-9]' | awk -v n="$TOP" 'NR <= n'
      echo
    fi
    echo "== top $TOP by inclusive time (children; without thread/runtime/syscall entry frames; all in $s.children.txt)"
    grep -vE "$GENERIC_FRAMES" "$OUT/$s.children.txt" | awk -v n="$TOP" 'NR <= n'
  } | sed -E 's/ +-? *$//' >"$report"
  stop_server
  stop_fake
  echo "$s: $report"
}

# send PATH COUNT: COUNT requests, one after the other on one keep-alive connection.
send() {
  python3 - "$SERVER_PORT" "$1" "$2" "$3" <<'PY'
import http.client, json, sys
port, path, count, tag = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
for i in range(count):
    if path == "/healthz":
        c.request("GET", path)
    else:
        body = json.dumps({"userId": f"u-{i % 1000}", "event": "Bench Event", "messageId": f"cg-{tag}-{i}",
                           "context": {"groupId": f"acct-{i % 100}"},
                           "properties": {"category": "Bench", "revenue": 42.99}}, separators=(",", ":"))
        c.request("POST", path, body, {"Content-Type": "application/json"})
    r = c.getresponse(); r.read()
    if r.status != 200:
        sys.exit(f"{path}: {r.status}")
PY
}

# Function lines only (an entry per function, not per inlined source file),
# without recursive poll chains counted more than once (over 100%), with
# shorter paths.
tidy_callgrind() {
  grep -E '^ *[0-9,]+ \(' | grep ' \[' | grep -v 'PROGRAM TOTALS' |
    awk '{p = $2; gsub(/[()%]/, "", p); if (p + 0 <= 100) print}' |
    sed -E 's#/root/\.cargo/registry/src/[^/]+/##; s#/rustc/[0-9a-f]+/library/##; s# \[[^]]*\]$##'
}

callgrind_scenario() {
  local s=$1 path=/v1/track pid ir report="$OUT/$1.txt" got
  [ "$s" = healthz ] && path=/healthz
  WAIT_SECS=300 WRAP="valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file=$OUT/$s.callgrind.%p" start "$s"
  pid=$bench_server_pid
  send "$path" 200 warm
  [ "$s" = whole ] && sleep 2
  rm -f "$OUT/$s.callgrind."*
  callgrind_control -z "$pid" >/dev/null
  callgrind_control -i on "$pid" >/dev/null
  send "$path" "$N" measured
  if [ "$s" = whole ]; then
    for _ in $(seq 1200); do got=$(fake_count "$FAKE_PORT"); [ "$got" -ge $((N + 200)) ] && break; sleep 0.1; done
  fi
  callgrind_control -i off "$pid" >/dev/null
  callgrind_control -d "$pid" >/dev/null
  sleep 1
  stop_server
  stop_fake
  # The dump (suffix .1) holds the measured requests; the file written at
  # exit holds nothing counted (instrumentation was off).
  local dumps=("$OUT/$s.callgrind".*.1)
  mv "${dumps[0]}" "$OUT/$s.callgrind"
  rm -f "$OUT/$s.callgrind".*
  ir=$(callgrind_annotate "$OUT/$s.callgrind" 2>/dev/null | awk '/PROGRAM TOTALS/ && !done {gsub(",", "", $1); print $1; done = 1}')
  {
    echo "== $s ($BACKEND): $N requests to $path, one connection; instructions (Ir) per request: $(awk -v a="$ir" -v n="$N" 'BEGIN {printf "%.0f", a / n}') (total $ir)"
    echo
    echo "== top $TOP inclusive"
    callgrind_annotate --inclusive=yes "$OUT/$s.callgrind" 2>/dev/null | tidy_callgrind | grep -vE "$GENERIC_FRAMES" | awk -v n="$TOP" 'NR <= n'
    echo
    echo "== top $TOP self"
    callgrind_annotate "$OUT/$s.callgrind" 2>/dev/null | tidy_callgrind | awk -v n="$TOP" 'NR <= n'
  } >"$report"
  echo "$s: $report"
}

for s in "${scenarios[@]}"; do
  "${TOOL}_scenario" "$s"
done
echo "reports in $OUT"
