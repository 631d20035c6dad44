#!/usr/bin/env bash
# Restart recovery throughput: messages accepted while Totango is unreachable,
# then a restart with Totango back: how fast does the stored queue drain?
#
#   bash bench/drain.sh            (needs wrk and sqlite3: apt-get install wrk sqlite3)
#
# Phase 1 ingests for $INGEST (the fake Totango is not running; one delivery in
# flight, so almost every message is still due when the server stops).
# Phase 2 starts the fake Totango and the server again, default settings, and
# times the queue from restart to empty.
set -euo pipefail
cd "$(dirname "$0")/.."
INGEST=${INGEST:-5s}
SERVER_PORT=${SERVER_PORT:-18090}
FAKE_PORT=${FAKE_PORT:-18091}

cargo build --release --quiet --bin totango-destination --example fake_totango
work=$(mktemp -d)
cleanup() { kill "${server_pid:-}" "${fake_pid:-}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

start_server() {
  TD_TOTANGO__SERVICE_ID=SP-1234-01 \
  TD_TOTANGO__ENDPOINT="http://127.0.0.1:$FAKE_PORT" \
  TD_STORAGE__URL="sqlite://$work/drain.db" \
  RUST_LOG=warn "$@" \
    target/release/totango-destination serve --listen "127.0.0.1:$SERVER_PORT" >>"$work/server.log" 2>&1 &
  server_pid=$!
  for _ in $(seq 100); do
    curl -fsS "http://127.0.0.1:$SERVER_PORT/readyz" >/dev/null 2>&1 && return
    sleep 0.05
  done
  echo "server did not start"; exit 1
}

start_server env TD_DELIVERY__CONCURRENCY=1
RUN=drain wrk -t2 -c32 -d"$INGEST" -s bench/track.lua "http://127.0.0.1:$SERVER_PORT" >/dev/null
kill -TERM "$server_pid"; wait "$server_pid" || true
queued=$(sqlite3 "$work/drain.db" "SELECT COUNT(*) FROM queue")
echo "queued while Totango was down: $queued"

target/release/examples/fake_totango "127.0.0.1:$FAKE_PORT" 2>/dev/null &
fake_pid=$!
sleep 0.3
start=$(date +%s.%N)
start_server env
while :; do
  left=$(sqlite3 "$work/drain.db" "SELECT COUNT(*) FROM queue" 2>/dev/null || echo "$queued")
  [ "$left" = "0" ] && break
  sleep 0.05
done
end=$(date +%s.%N)
secs=$(echo "$end - $start" | bc -l)
printf 'drained %s messages in %.2f s from the restart: %.0f messages/s\n' "$queued" "$secs" "$(echo "$queued / $secs" | bc -l)"
echo "requests received by the fake Totango: $(curl -fsS "http://127.0.0.1:$FAKE_PORT/count")"
echo "messages by state: $(sqlite3 "$work/drain.db" "SELECT group_concat(state || '=' || n, ', ') FROM (SELECT state, COUNT(*) n FROM messages GROUP BY state)")"
