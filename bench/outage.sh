#!/usr/bin/env bash
# Ingest while Totango is down and a large backlog is waiting for retries:
# accepting new messages must not slow down with the size of the queue.
#
#   bash bench/outage.sh          (needs wrk: apt-get install wrk)
#
# Queues $BACKLOG messages over 1,000 users through /v1/batch with Totango
# unreachable (every attempt fails and is retried), then drives /v1/track with
# 16 connections for 10 s and reports throughput and latency.
set -euo pipefail
cd "$(dirname "$0")/.."
BACKLOG=${BACKLOG:-300000}
PORT=${PORT:-18090}
cargo build --release --quiet --bin totango-destination
work=$(mktemp -d)
cleanup() { kill "${server_pid:-}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
TD_TOTANGO__SERVICE_ID=SP-1234-01 TD_TOTANGO__ENDPOINT=http://127.0.0.1:9 \
TD_STORAGE__URL="sqlite://$work/outage.db" RUST_LOG=error \
  target/release/totango-destination serve --listen "127.0.0.1:$PORT" >"$work/server.log" 2>&1 &
server_pid=$!
for _ in $(seq 100); do curl -fsS "http://127.0.0.1:$PORT/readyz" >/dev/null 2>&1 && break; sleep 0.05; done
python3 - "$PORT" "$BACKLOG" <<'PY'
import json, sys, urllib.request
port, total = int(sys.argv[1]), int(sys.argv[2])
n = 0
while n < total:
    batch = [{"type": "track", "userId": f"u-{(n + i) % 1000}", "event": "Backlog",
              "messageId": f"b-{n + i}", "context": {"groupId": "acct"}} for i in range(min(2500, total - n))]
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/batch", data=json.dumps({"batch": batch}).encode(),
                                 headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req).read()
    n += len(batch)
PY
echo "queued: $(curl -fsS "http://127.0.0.1:$PORT/metrics" | awk '$1=="td_queue_depth" {print $2}')"
out=$(RUN=outage wrk -t2 -c16 -d10s --latency -s bench/track.lua "http://127.0.0.1:$PORT")
echo "during the outage: $(awk '/Requests\/sec/ {print $2}' <<<"$out") requests/s," \
     "p50 $(awk '$1=="50%" {print $2}' <<<"$out"), p99 $(awk '$1=="99%" {print $2}' <<<"$out")"
