#!/usr/bin/env bash
# Ingest throughput of `serve` on the embedded SQLite storage (WAL,
# synchronous=FULL: every 200 is fsync'd), at several client concurrencies,
# with delivery running against a local fake Totango.
#
#   bash bench/ingest.sh            (needs wrk: apt-get install wrk)
#   BIN=path/to/other/totango-destination bash bench/ingest.sh   (another build; see
#   bench/compare_ingest.sh to compare two builds in one run)
#
# With one fsync per request, throughput would stay flat as concurrency grows;
# group commit lets concurrent requests share a commit, so it should rise.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10s}
SERVER_PORT=${SERVER_PORT:-18090}
FAKE_PORT=${FAKE_PORT:-18091}

BIN=${BIN:-target/release/totango-destination}
cargo build --release --quiet --bin totango-destination --example fake_totango
work=$(mktemp -d)
cleanup() { kill "${server_pid:-}" "${fake_pid:-}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

target/release/examples/fake_totango "127.0.0.1:$FAKE_PORT" --delay-ms "${FAKE_DELAY_MS:-0}" 2>"$work/fake.log" &
fake_pid=$!
TD_TOTANGO__SERVICE_ID=SP-1234-01 \
TD_TOTANGO__ENDPOINT="http://127.0.0.1:$FAKE_PORT" \
TD_STORAGE__URL="sqlite://$work/bench.db" \
RUST_LOG=warn \
  "$BIN" serve --listen "127.0.0.1:$SERVER_PORT" >"$work/server.log" 2>&1 &
server_pid=$!
for _ in $(seq 100); do
  curl -fsS "http://127.0.0.1:$SERVER_PORT/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done

# The ceiling of this machine's HTTP stack in the same run: /healthz does no work.
healthz=$(wrk -t2 -c64 -d"$DURATION" "http://127.0.0.1:$SERVER_PORT/healthz" 2>&1 | awk '/Requests\/sec/ {print $2}')
echo "GET /healthz at 64 connections: $healthz requests/s"

echo "connections | requests/s | p50 latency | p99 latency"
for c in 1 8 64; do
  t=$(( c < 2 ? c : 2 ))
  out=$(RUN="c$c" wrk -t"$t" -c"$c" -d"$DURATION" --latency -s bench/track.lua "http://127.0.0.1:$SERVER_PORT" 2>&1)
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  p50=$(awk '$1=="50%" {print $2}' <<<"$out")
  p99=$(awk '$1=="99%" {print $2}' <<<"$out")
  non2xx=$(awk '/Non-2xx/ {print $NF}' <<<"$out")
  echo "$c | $rps | $p50 | $p99${non2xx:+ | non-2xx: $non2xx}"
  if [ "$c" = 64 ]; then echo "POST /v1/track ÷ GET /healthz at 64 connections: $(awk -v a="$rps" -v b="$healthz" 'BEGIN {printf "%.2f", a / b}')"; fi
done

# Let delivery catch up, then report what reached the fake Totango.
for _ in $(seq 300); do
  pending=$(sqlite3 "$work/bench.db" "SELECT COUNT(*) FROM queue" 2>/dev/null || echo "?")
  [ "$pending" = "0" ] && break
  sleep 0.2
done
echo "messages by state: $(sqlite3 "$work/bench.db" "SELECT group_concat(state || '=' || n, ', ') FROM (SELECT state, COUNT(*) n FROM messages GROUP BY state)")"
echo "requests received by the fake Totango: $(curl -fsS "http://127.0.0.1:$FAKE_PORT/count"); still queued: ${pending}"
echo "server peak memory (VmHWM): $(awk '/VmHWM/ {print $2, $3}' "/proc/$server_pid/status")"
