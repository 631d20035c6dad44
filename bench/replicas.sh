#!/usr/bin/env bash
# Ingest and delivery throughput of one SQLite instance, one PostgreSQL
# replica and two PostgreSQL replicas, each setup on a fresh database.
#
#   bash bench/replicas.sh      (needs wrk, curl, psql, python3, a PostgreSQL server)
#   BENCH_DATABASE_URL=postgres://postgres@127.0.0.1:5432/test SETUPS="sqlite1 pg1 pg2" \
#     DURATION=10s MESSAGES=100000 bash bench/replicas.sh
#
# Ingest: POST /v1/track (bench/track.lua, unique messageIds, 1,000 users) for
# DURATION at 64 connections in all, split evenly over the replicas (one wrk per
# replica; the requests/s are added up), with delivery running against a fake
# Totango that answers at once. Every 200 is committed.
#
# Delivery: MESSAGES track calls (1,000 users) are queued through /v1/batch
# while Totango never answers (one request in flight per replica, timing out
# after 1 s and retried later: a few dozen messages get a retry due within a
# second or two), the replicas are stopped (SIGTERM), then started again with
# the default configuration against a fake Totango answering after 100 ms
# (examples/fake_totango.rs --delay-ms 100). The rate is MESSAGES over the time
# from that start until the fake has received every message (as
# bench/delivery.sh does).
#
# BENCH_DATABASE_URL (or TEST_DATABASE_URL) names a server where this user may
# create databases; a td_bench_* database is created per PostgreSQL setup and
# dropped afterwards. Everything runs on this machine: wrk and the fakes share
# its cores with the replicas and PostgreSQL.
set -euo pipefail
cd "$(dirname "$0")/.."
SETUPS=${SETUPS:-"sqlite1 pg1 pg2"}
DURATION=${DURATION:-10s}
MESSAGES=${MESSAGES:-100000}
DELAY_MS=${DELAY_MS:-100}
PG_URL=${BENCH_DATABASE_URL:-${TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}}
BASE_PORT=${BASE_PORT:-18190}
FAKE_PORT=${FAKE_PORT:-18191}
STALL_PORT=${STALL_PORT:-18192}
TARGET=${CARGO_TARGET_DIR:-target}
BIN=$TARGET/release/totango-destination
# Open mode (no write keys, loopback only): bench/track.lua sends no credentials.
KEY=bench-key
ADMIN=bench-admin

for tool in wrk curl psql python3; do
  command -v "$tool" >/dev/null || { echo "needs $tool (apt-get install wrk curl postgresql-client python3)"; exit 1; }
done
cargo build --release --quiet --bin totango-destination --example fake_totango
work=$(mktemp -d)
server_pids=()
fake_pid=""
databases=()
stop_servers() {
  for pid in "${server_pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
  server_pids=()
}
stop_fake() {
  if [ -n "$fake_pid" ]; then kill "$fake_pid" 2>/dev/null || true; wait "$fake_pid" 2>/dev/null || true; fi
  fake_pid=""
}
cleanup() {
  stop_servers
  stop_fake
  for db in "${databases[@]}"; do
    psql -q "$PG_URL" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
  done
  rm -rf "$work"
}
trap cleanup EXIT

# Sets storage_url to a fresh SQLite file or a new PostgreSQL database.
fresh_storage() {
  local kind=$1 name
  name="td_bench_$(date +%s%N | tail -c 9)_$RANDOM"
  if [ "$kind" = sqlite ]; then
    storage_url="sqlite://$work/$name.db"
  else
    psql -q "$PG_URL" -c "CREATE DATABASE $name" >/dev/null
    databases+=("$name")
    # Same server and credentials, the new database's name as the path.
    storage_url=$(python3 -c 'import sys, urllib.parse as u; p = u.urlsplit(sys.argv[1]); print(u.urlunsplit(p._replace(path="/" + sys.argv[2])))' "$PG_URL" "$name")
  fi
}

start_fake() {
  "$TARGET/release/examples/fake_totango" "127.0.0.1:$1" --delay-ms "$2" 2>/dev/null &
  fake_pid=$!
  for _ in $(seq 100); do curl -fsS "http://127.0.0.1:$1/count" >/dev/null 2>&1 && return; sleep 0.05; done
  echo "fake Totango did not start"; exit 1
}

# start_servers COUNT STORAGE_URL ENDPOINT [VAR=VALUE...]: replicas on BASE_PORT, BASE_PORT+10, …
start_servers() {
  local count=$1 url=$2 endpoint=$3 i port
  shift 3
  for i in $(seq 0 $((count - 1))); do
    port=$((BASE_PORT + 10 * i))
    env TD_TOTANGO__SERVICE_ID=SP-1234-01 TD_TOTANGO__ENDPOINT="$endpoint" \
      TD_STORAGE__URL="$url" TD_ADMIN__TOKEN="$ADMIN" \
      RUST_LOG=warn "$@" \
      "$BIN" serve --listen "127.0.0.1:$port" >>"$work/server-$i.log" 2>&1 &
    server_pids+=($!)
  done
  for i in $(seq 0 $((count - 1))); do
    port=$((BASE_PORT + 10 * i))
    for _ in $(seq 600); do
      curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && continue 2
      kill -0 "${server_pids[$i]}" 2>/dev/null || break
      sleep 0.05
    done
    echo "replica $i did not become ready:"; tail -20 "$work/server-$i.log"; exit 1
  done
}

queue_depth() {
  curl -fsS -H "Authorization: Bearer $ADMIN" "http://127.0.0.1:$BASE_PORT/api/stats" |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["queue"]["depth"])'
}

peak_rss() {
  local pid out=""
  for pid in "${server_pids[@]}"; do
    out+="$(awk '/VmHWM/ {printf "%d MB", $2 / 1024}' "/proc/$pid/status") "
  done
  echo "${out% }"
}

# Durable ingest: requests/s (summed over replicas), worst p99, non-2xx answers.
measure_ingest() {
  local count=$1 kind=$2 url i pids=() conns rps=0 p99 worst=0 bad=0 out
  fresh_storage "$kind"; url=$storage_url
  start_fake "$FAKE_PORT" 0
  start_servers "$count" "$url" "http://127.0.0.1:$FAKE_PORT"
  conns=$((64 / count))
  for i in $(seq 0 $((count - 1))); do
    RUN="$kind$count-r$i" wrk -t$((count == 1 ? 2 : 1)) -c"$conns" -d"$DURATION" --latency -s bench/track.lua \
      "http://127.0.0.1:$((BASE_PORT + 10 * i))" >"$work/wrk-$i.txt" 2>&1 &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid"; done
  for i in $(seq 0 $((count - 1))); do
    out=$(cat "$work/wrk-$i.txt")
    rps=$(awk -v a="$rps" '/Requests\/sec/ {printf "%.0f", a + $2}' <<<"$out")
    p99=$(awk '$1=="99%" {v=$2; if (v ~ /us$/) n=v/1000; else if (v ~ /ms$/) n=v+0; else n=v*1000; printf "%.2f", n}' <<<"$out")
    worst=$(awk -v a="$worst" -v b="$p99" 'BEGIN {print (b > a ? b : a)}')
    bad=$((bad + $(awk '/Non-2xx/ {print $NF}' <<<"$out" | grep -E '^[0-9]+$' || echo 0)))
  done
  ingest_rps=$rps ingest_p99="$worst ms" ingest_bad=$bad ingest_rss=$(peak_rss)
  stop_servers
  stop_fake
}

# Backlog drain at DELAY_MS per answer: messages/s and seconds.
measure_delivery() {
  local count=$1 kind=$2 url i start end got
  fresh_storage "$kind"; url=$storage_url
  python3 - "$MESSAGES" "$work" <<'PY'
import json, sys
n, work = int(sys.argv[1]), sys.argv[2]
for b in range(0, n, 1000):
    batch = [{"type": "track", "userId": f"u-{i % 1000}", "event": "Bench Event",
              "messageId": f"drain-{i}", "context": {"groupId": f"acct-{i % 100}"},
              "properties": {"category": "Bench"}} for i in range(b, min(n, b + 1000))]
    open(f"{work}/batch-{b // 1000:05d}.json", "w").write(json.dumps({"batch": batch}))
PY
  # Queue the backlog: Totango never answers, one request in flight per replica.
  start_fake "$STALL_PORT" 3600000
  start_servers "$count" "$url" "http://127.0.0.1:$STALL_PORT" \
    TD_DELIVERY__CONCURRENCY=1 TD_DELIVERY__MIN_CONCURRENCY=1 TD_DELIVERY__MAX_CONCURRENCY=1 \
    TD_DELIVERY__REQUEST_TIMEOUT_MS=1000 TD_STORAGE__LEASE_SECS=3
  i=0
  for f in "$work"/batch-*.json; do
    curl -fsS -u "$KEY:" -H 'content-type: application/json' --data-binary @"$f" \
      "http://127.0.0.1:$((BASE_PORT + 10 * (i % count)))/v1/batch" >/dev/null
    i=$((i + 1))
  done
  rm -f "$work"/batch-*.json
  delivery_queued=$(queue_depth)
  # SIGTERM: the request in flight times out and is recorded, so no lease is left behind.
  for pid in "${server_pids[@]}"; do kill -TERM "$pid"; done
  for pid in "${server_pids[@]}"; do wait "$pid" || true; done
  server_pids=()
  stop_fake
  # Drain it with the defaults.
  start_fake "$FAKE_PORT" "$DELAY_MS"
  start=$(date +%s.%N)
  start_servers "$count" "$url" "http://127.0.0.1:$FAKE_PORT"
  while :; do
    got=$(curl -fsS "http://127.0.0.1:$FAKE_PORT/count" 2>/dev/null || echo 0)
    [ "$got" -ge "$MESSAGES" ] && break
    for pid in "${server_pids[@]}"; do
      kill -0 "$pid" 2>/dev/null || { echo "a replica exited:"; tail -20 "$work"/server-*.log; exit 1; }
    done
    sleep 0.1
  done
  end=$(date +%s.%N)
  delivery_secs=$(awk -v a="$start" -v b="$end" 'BEGIN {printf "%.2f", b - a}')
  delivery_rate=$(awk -v n="$MESSAGES" -v s="$delivery_secs" 'BEGIN {printf "%.0f", n / s}')
  delivery_rss=$(peak_rss)
  delivery_received=$(curl -fsS "http://127.0.0.1:$FAKE_PORT/count")
  stop_servers
  stop_fake
}

rows=()
for setup in $SETUPS; do
  case $setup in
    sqlite1) kind=sqlite count=1 label="SQLite, 1 instance" ;;
    pg1) kind=pg count=1 label="PostgreSQL, 1 replica" ;;
    pg2) kind=pg count=2 label="PostgreSQL, 2 replicas" ;;
    *) echo "unknown setup $setup (sqlite1, pg1, pg2)"; exit 1 ;;
  esac
  echo "== $label" >&2
  measure_ingest "$count" "$kind"
  echo "   ingest: $ingest_rps requests/s, p99 $ingest_p99, non-2xx $ingest_bad, peak RSS $ingest_rss" >&2
  measure_delivery "$count" "$kind"
  echo "   delivery: $delivery_queued queued, $delivery_rate messages/s ($delivery_secs s), fake received $delivery_received, peak RSS $delivery_rss" >&2
  rows+=("| $label | $ingest_rps | $ingest_p99 | $delivery_rate | $delivery_secs | $delivery_rss |")
done

echo
echo "Ingest: POST /v1/track, 64 connections in all, $DURATION. Delivery: $MESSAGES queued track calls, answers after $DELAY_MS ms."
echo
echo "| setup | durable ingest (requests/s) | ingest p99 (worst replica) | delivery (messages/s) | drain time (s) | peak RSS while draining |"
echo "|---|---|---|---|---|---|"
printf '%s\n' "${rows[@]}"
