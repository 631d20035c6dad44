#!/usr/bin/env bash
# Delivery throughput against a Totango that answers after a delay: a stored
# backlog is drained by the server with the default configuration, and the
# fake Totango counts what arrives.
#
#   bash bench/delivery.sh               (needs curl)
#   MESSAGES=200000 DELAYS="0 20 100" USERS="1000 1" bash bench/delivery.sh
#   BIN=path/to/other/totango-destination bash bench/delivery.sh   (another build)
#
# For each answer delay and user count: queue MESSAGES track calls straight
# into a fresh SQLite file (examples/queue_backlog.rs), start the fake Totango
# (examples/fake_totango.rs --delay-ms D) and the server, and time from the
# server's start until the fake has received every message. Also prints the
# server's peak resident memory (VmHWM) while draining.
set -euo pipefail
cd "$(dirname "$0")/.."
MESSAGES=${MESSAGES:-200000}
DELAYS=${DELAYS:-"0 20 100"}
USERS=${USERS:-"1000 1"}
SERVER_PORT=${SERVER_PORT:-18090}
FAKE_PORT=${FAKE_PORT:-18091}
BIN=${BIN:-target/release/totango-destination}

cargo build --release --quiet --bin totango-destination --example fake_totango --example queue_backlog
work=$(mktemp -d)
cleanup() { kill "${server_pid:-}" "${fake_pid:-}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

echo "answer delay | users | messages | seconds | delivered msgs/s | peak RSS"
for delay in $DELAYS; do
  for users in $USERS; do
    rm -f "$work"/bench.db*
    target/release/examples/queue_backlog "$work/bench.db" "$MESSAGES" "$users" 2>/dev/null
    target/release/examples/fake_totango "127.0.0.1:$FAKE_PORT" --delay-ms "$delay" 2>/dev/null &
    fake_pid=$!
    for _ in $(seq 100); do curl -fsS "http://127.0.0.1:$FAKE_PORT/count" >/dev/null 2>&1 && break; sleep 0.05; done
    start=$(date +%s.%N)
    TD_TOTANGO__SERVICE_ID=SP-1234-01 \
    TD_TOTANGO__ENDPOINT="http://127.0.0.1:$FAKE_PORT" \
    TD_STORAGE__URL="sqlite://$work/bench.db" \
    RUST_LOG=warn \
      "$BIN" serve --listen "127.0.0.1:$SERVER_PORT" >>"$work/server.log" 2>&1 &
    server_pid=$!
    while :; do
      got=$(curl -fsS "http://127.0.0.1:$FAKE_PORT/count" 2>/dev/null || echo 0)
      [ "$got" -ge "$MESSAGES" ] && break
      kill -0 "$server_pid" 2>/dev/null || { echo "server exited"; tail "$work/server.log"; exit 1; }
      sleep 0.1
    done
    end=$(date +%s.%N)
    rss=$(awk '/VmHWM/ {print $2, $3}' "/proc/$server_pid/status")
    kill -TERM "$server_pid"; wait "$server_pid" || true
    kill "$fake_pid"; wait "$fake_pid" 2>/dev/null || true
    secs=$(awk -v a="$start" -v b="$end" 'BEGIN {printf "%.2f", b - a}')
    rate=$(awk -v n="$MESSAGES" -v s="$secs" 'BEGIN {printf "%.0f", n / s}')
    echo "$delay ms | $users | $MESSAGES | $secs | $rate | $rss"
  done
done
