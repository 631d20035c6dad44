#!/usr/bin/env bash
# Delivery rate of any build (also one with an older database schema): the
# backlog goes in through /v1/batch while the fake Totango answers after
# DELAY ms; the rate is what the fake receives over a fixed window.
#
#   BIN=path/to/totango-destination DELAY=100 USERS=1000 bash bench/delivery_http.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/totango-destination}
DELAY=${DELAY:-100}
USERS=${USERS:-1000}
MESSAGES=${MESSAGES:-40000}
WINDOW=${WINDOW:-10}
SERVER_PORT=${SERVER_PORT:-18090}
FAKE_PORT=${FAKE_PORT:-18091}

cargo build --release --quiet --example fake_totango
work=$(mktemp -d)
cleanup() { kill "${server_pid:-}" "${fake_pid:-}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
target/release/examples/fake_totango "127.0.0.1:$FAKE_PORT" --delay-ms "$DELAY" 2>/dev/null &
fake_pid=$!
TD_TOTANGO__SERVICE_ID=SP-1234-01 \
TD_TOTANGO__ENDPOINT="http://127.0.0.1:$FAKE_PORT" \
TD_STORAGE__URL="sqlite://$work/bench.db" \
RUST_LOG=warn \
  "$BIN" serve --listen "127.0.0.1:$SERVER_PORT" >"$work/server.log" 2>&1 &
server_pid=$!
for _ in $(seq 100); do curl -fsS "http://127.0.0.1:$SERVER_PORT/readyz" >/dev/null 2>&1 && break; sleep 0.05; done
python3 - "$MESSAGES" "$USERS" "$work" <<'PY'
import json, sys
n, users, work = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
for b in range(0, n, 2000):
    batch = [{"type": "track", "userId": f"u-{i % users}", "event": "Bench Event",
              "messageId": f"http-{i}", "context": {"groupId": f"acct-{i % 100}"},
              "properties": {"category": "Bench"}} for i in range(b, min(n, b + 2000))]
    open(f"{work}/batch-{b // 2000}.json", "w").write(json.dumps({"batch": batch}))
PY
for f in "$work"/batch-*.json; do
  curl -fsS -u key: -H 'content-type: application/json' --data-binary @"$f" \
    "http://127.0.0.1:$SERVER_PORT/v1/batch" >/dev/null
done
sleep 2
first=$(curl -fsS "http://127.0.0.1:$FAKE_PORT/count")
sleep "$WINDOW"
last=$(curl -fsS "http://127.0.0.1:$FAKE_PORT/count")
echo "$BIN, answer delay $DELAY ms, $USERS users: $(( (last - first) / WINDOW )) messages/s delivered over ${WINDOW} s"
