#!/usr/bin/env bash
# The whole path: durable ingest under wrk while delivery sends every accepted
# message to a Totango that answers after 100 ms, on one instance.
#
#   bash bench/whole_path.sh                        (SQLite and PostgreSQL, one round)
#   bash bench/whole_path.sh --backend sqlite --rounds 3
#   DURATION=12s DELAY_MS=100 TRACK_USERS=1000 bash bench/whole_path.sh --backend postgres
#
# Needs wrk, curl, psql (for --backend postgres; BENCH_DATABASE_URL or
# TEST_DATABASE_URL names a server where this user may create databases, else
# postgres://postgres@127.0.0.1:5432/test). BIN=other/build to measure another build.
#
# Each round and backend, on a fresh database, with the server's default
# configuration and the fake Totango (examples/fake_totango.rs --delay-ms 100):
#   1. GET /healthz with wrk (2 threads, 64 connections) for DURATION: the
#      ceiling of this machine's HTTP stack in this run (nothing queued yet);
#   2. POST /v1/track with wrk (2 threads, 64 connections, bench/track.lua:
#      unique messageIds, TRACK_USERS users) for DURATION while delivery runs;
#   3. then waits until the fake has received every accepted message.
# Prints: /healthz req/s; accepted/s (messages the storage holds after the load,
# from the admin API, over wrk's duration: it includes the few requests in
# flight when wrk stopped, so it can exceed wrk's 2xx count and the server's
# td_messages_accepted_total, both shown in the last column); the share of them the fake
# had received when wrk stopped; drain time after wrk stopped; end-to-end msg/s
# (accepted ÷ (load + drain)); accepted/s ÷ /healthz; the server's peak RSS
# (VmHWM) at the end of the load; the server's CPU during the load (user +
# system, in cores, and per accepted message: while ingest and delivery run
# together this is the cost of a message in and out; PostgreSQL's own CPU is
# not included), and its CPU per /healthz request for comparison; on
# PostgreSQL, the CPU of every postgres process on the machine during the load. With --rounds N, the median of each column per
# backend and, with both backends, PostgreSQL's end-to-end rate ÷ SQLite's
# median. wrk, the fake, PostgreSQL and the server share the machine's cores.
#
# --scenario ingest|outage (default whole) measures the other two scenarios of
# issue 20 the same way, without the drain: ingest with delivery idle (the fake
# never answers in time), outage with Totango refusing connections.
set -euo pipefail
cd "$(dirname "$0")/.."
BACKENDS="sqlite postgres"
ROUNDS=${ROUNDS:-1}
SCENARIO=${SCENARIO:-whole}
while [ $# -gt 0 ]; do
  case $1 in
    --backend) BACKENDS=${2:?--backend sqlite|postgres|both}; [ "$BACKENDS" = both ] && BACKENDS="sqlite postgres"; shift 2 ;;
    --rounds) ROUNDS=${2:?--rounds N}; shift 2 ;;
    --scenario) SCENARIO=${2:?--scenario whole|ingest|outage}; shift 2 ;;
    -h|--help) sed -n '2,36p' "$0"; exit 0 ;;
    *) echo "unknown argument $1 (--backend sqlite|postgres|both, --rounds N)" >&2; exit 2 ;;
  esac
done
DURATION=${DURATION:-12s}
DELAY_MS=${DELAY_MS:-100}
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-2}
DRAIN_TIMEOUT_SECS=${DRAIN_TIMEOUT_SECS:-300}
SERVER_PORT=${SERVER_PORT:-18290}
FAKE_PORT=${FAKE_PORT:-18291}
source bench/lib.sh

need_tools wrk curl python3
case " $BACKENDS " in *" postgres "*) need_tools psql ;; esac
[ -n "${SKIP_BUILD:-}" ] || cargo build --release --quiet --bin totango-destination --example fake_totango
work=$(mktemp -d)
bench_traps

now() { date +%s.%N; }

# One round on one backend: sets the row_* variables.
whole_path() {
  local backend=$1 round=$2 endpoint cpu0 cpu1 pg0 pg1 out t0 t1 requests non2xx secs delivered_at_stop accepted recount deadline got=0
  fresh_storage "$backend"
  case $SCENARIO in
    whole) start_fake "$FAKE_PORT" "$DELAY_MS"; endpoint="http://127.0.0.1:$FAKE_PORT" ;;
    ingest) start_fake "$FAKE_PORT" 3600000; endpoint="http://127.0.0.1:$FAKE_PORT" ;;
    outage) endpoint=http://127.0.0.1:9 ;;
  esac
  start_server "$SERVER_PORT" "$storage_url" "$endpoint"

  cpu0=$(cpu_secs "$bench_server_pid")
  out=$(wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" "http://127.0.0.1:$SERVER_PORT/healthz" 2>&1)
  cpu1=$(cpu_secs "$bench_server_pid")
  row_healthz=$(wrk_rps "$out")
  row_cpu_healthz=$(awk -v a="$cpu0" -v b="$cpu1" -v n="$(wrk_requests "$out")" 'BEGIN {printf "%.1f", (n ? (b - a) * 1e6 / n : 0)}')

  cpu0=$(cpu_secs "$bench_server_pid"); pg0=$(postgres_cpu_secs)
  out=$(RUN="whole-$backend-$round-$$" wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency \
    -s bench/track.lua "http://127.0.0.1:$SERVER_PORT" 2>&1)
  t0=$(now)
  delivered_at_stop=$(fake_count "$FAKE_PORT")
  row_rss=$(peak_rss "$bench_server_pid")
  cpu1=$(cpu_secs "$bench_server_pid"); pg1=$(postgres_cpu_secs)
  accepted=$(stored_messages "$SERVER_PORT")
  row_counter=$(metric "$SERVER_PORT" td_messages_accepted_total)
  requests=$(wrk_requests "$out"); non2xx=$(wrk_non2xx "$out"); secs=$(wrk_secs "$out")
  row_p99=$(awk '$1=="99%" {print $2}' <<<"$out")
  row_wrk_2xx=$((requests - non2xx))

  # Drain: until the fake has received every accepted message (nothing
  # arrives in the other scenarios).
  deadline=$(awk -v a="$t0" -v d="$DRAIN_TIMEOUT_SECS" 'BEGIN {printf "%.0f", a + d}')
  # Requests that were in flight when wrk closed its connections may still
  # commit, so the stored count is read again once the fake has caught up.
  while [ "$SCENARIO" = whole ]; do
    got=$(fake_count "$FAKE_PORT")
    if [ "$got" -ge "$accepted" ]; then
      recount=$(stored_messages "$SERVER_PORT")
      [ "$recount" -le "$accepted" ] && break
      accepted=$recount
      continue
    fi
    if [ "$(date +%s)" -ge "$deadline" ]; then echo "drain did not finish in ${DRAIN_TIMEOUT_SECS} s ($got of $accepted)" >&2; break; fi
    kill -0 "$bench_server_pid" 2>/dev/null || { echo "server exited:" >&2; tail -20 "$work/server.log" >&2; exit 1; }
    sleep 0.05
  done
  t1=$(now)
  if [ "$SCENARIO" != whole ]; then
    got=$(fake_count "$FAKE_PORT"); accepted=$(stored_messages "$SERVER_PORT"); t1=$t0
  fi
  row_queue=$(metric "$SERVER_PORT" td_queue_depth)
  row_accepted=$accepted
  row_delivered=$got
  row_rate=$(awk -v n="$accepted" -v s="$secs" 'BEGIN {printf "%.0f", n / s}')
  row_share=$(awk -v d="$delivered_at_stop" -v n="$accepted" 'BEGIN {printf "%.3f", (n ? d / n : 0)}')
  row_drain=$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.2f", b - a}')
  row_e2e=$(awk -v n="$accepted" -v s="$secs" -v d="$row_drain" 'BEGIN {printf "%.0f", n / (s + d)}')
  row_cpu=$(awk -v a="$cpu0" -v b="$cpu1" -v s="$secs" 'BEGIN {printf "%.2f", (b - a) / s}')
  row_pg_cpu=-
  [ "$backend" = postgres ] && row_pg_cpu=$(awk -v a="$pg0" -v b="$pg1" -v s="$secs" 'BEGIN {printf "%.2f", (b - a) / s}')
  row_cpu_msg=$(awk -v a="$cpu0" -v b="$cpu1" -v n="$accepted" 'BEGIN {printf "%.0f", (n ? (b - a) * 1e6 / n : 0)}')
  row_ratio=$(awk -v a="$row_rate" -v b="$row_healthz" 'BEGIN {printf "%.3f", a / b}')
  stop_server
  stop_fake
}

declare -A col
columns="healthz rate share drain e2e ratio rss cpu cpu_msg cpu_healthz pg_cpu"
case $SCENARIO in
  whole) ;;
  ingest) echo "Scenario ingest: delivery idle (the fake Totango never answers in time); drain columns do not apply." ;;
  outage) echo "Scenario outage: Totango refuses connections (127.0.0.1:9); drain columns do not apply." ;;
  *) echo "unknown scenario $SCENARIO (whole, ingest, outage)" >&2; exit 2 ;;
esac
echo "Whole path: $DURATION of POST /v1/track (wrk -t$THREADS -c$CONNECTIONS) with delivery to the fake Totango answering after $DELAY_MS ms; GET /healthz in the same round."
echo
echo "| backend | round | GET /healthz req/s | accepted/s | delivered during load | drain after load (s) | end-to-end msg/s | accepted ÷ healthz | peak RSS (MB) | server CPU (cores) | server CPU µs per message | server CPU µs per /healthz | PostgreSQL CPU (cores) | track p99 | stored / wrk 2xx / accepted counter / received by fake / queue depth at drain end |"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
for round in $(seq "$ROUNDS"); do
  for backend in $BACKENDS; do
    whole_path "$backend" "$round"
    echo "| $backend | $round | $row_healthz | $row_rate | $row_share | $row_drain | $row_e2e | $row_ratio | $row_rss | $row_cpu | $row_cpu_msg | $row_cpu_healthz | $row_pg_cpu | $row_p99 | $row_accepted / $row_wrk_2xx / $row_counter / $row_delivered / $row_queue |"
    for c in $columns; do v="row_$c"; col[$backend-$c]+="${!v} "; done
  done
done
if [ "$ROUNDS" -gt 1 ] || [ "$(wc -w <<<"$BACKENDS")" -gt 1 ]; then
  echo
  echo "| backend (median of $ROUNDS) | GET /healthz req/s | accepted/s | delivered during load | drain (s) | end-to-end msg/s | accepted ÷ healthz | peak RSS (MB) | server CPU (cores) | server CPU µs per message | server CPU µs per /healthz | PostgreSQL CPU (cores) |"
  echo "|---|---|---|---|---|---|---|---|---|---|---|---|"
  declare -A med
  for backend in $BACKENDS; do
    line="| $backend"
    for c in $columns; do
      med[$backend-$c]=$(tr ' ' '\n' <<<"${col[$backend-$c]}" | grep . | median)
      line+=" | ${med[$backend-$c]}"
    done
    echo "$line |"
  done
  if [ -n "${med[sqlite-e2e]:-}" ] && [ -n "${med[postgres-e2e]:-}" ]; then
    echo
    echo "PostgreSQL ÷ SQLite (medians): end-to-end $(awk -v a="${med[postgres-e2e]}" -v b="${med[sqlite-e2e]}" 'BEGIN {printf "%.2f", a / b}'), accepted/s $(awk -v a="${med[postgres-rate]}" -v b="${med[sqlite-rate]}" 'BEGIN {printf "%.2f", a / b}')"
  fi
fi
