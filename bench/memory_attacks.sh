#!/usr/bin/env bash
# Issue 14 item 2: the three memory attacks against the release binary, each
# reported as the server's peak RSS above idle (VmRSS of /proc/PID/status,
# sampled every 50 ms). Loopback only (127.0.0.x).
#
#   bash bench/memory_attacks.sh
#   BIN=path/to/totango-destination bash bench/memory_attacks.sh   (another build)
#
# 1. 1,000 connections from 4 addresses each send ~2 KB of gzip that inflates
#    to 2 MB to POST /login, chunked, and never finish.
# 2. The same against POST /v1/batch without credentials (the key may be in
#    the body): 2 MB bombs (refused by size, 413), and 490 KB ones (under
#    limits.max_body_bytes once inflated).
# 3. 300 concurrent complete ~500 KB batches from 3 addresses, with a key.
# Goal: under 300 MB above idle for each. The server runs with its defaults
# (limits.max_inflight_body_bytes, limits.uncredentialed_body_grace_ms, …).
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=${PORT:-18190}
BIN=${BIN:-target/release/totango-destination}
if [ -z "${SKIP_BUILD:-}" ]; then
  cargo build --release --quiet --bin totango-destination
fi
work=$(mktemp -d)
cleanup() { kill "${server_pid:-}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
ulimit -n 20000 2>/dev/null || true

TD_AUTH__WRITE_KEYS=bench-key \
TD_ADMIN__TOKEN=bench-admin-token-0123456789abcdef \
TD_TOTANGO__SERVICE_ID=SP-1234-01 \
TD_TOTANGO__ENDPOINT="http://127.0.0.1:9" \
TD_STORAGE__URL="sqlite://$work/bench.db" \
RUST_LOG=error \
  "$BIN" serve --listen "127.0.0.1:$PORT" >"$work/server.log" 2>&1 &
server_pid=$!
for _ in $(seq 100); do
  curl -fs "http://127.0.0.1:$PORT/healthz" >/dev/null 2>&1 && break
  sleep 0.1
done

python3 - "$server_pid" "$PORT" <<'PY'
import base64, gzip, json, socket, sys, threading, time

pid, port = int(sys.argv[1]), int(sys.argv[2])

def rss_mb():
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0

class Sampler:
    def __init__(self):
        self.peak, self.stop = 0.0, False
        self.t = threading.Thread(target=self.run, daemon=True)
    def run(self):
        while not self.stop:
            self.peak = max(self.peak, rss_mb())
            time.sleep(0.05)
    def __enter__(self):
        self.t.start(); return self
    def __exit__(self, *a):
        self.stop = True; self.t.join()

def connect(i, addresses):
    s = socket.socket()
    s.bind((f"127.0.0.{2 + i % addresses}", 0))
    s.settimeout(10)
    s.connect(("127.0.0.1", port))
    return s

def settle():
    time.sleep(3)
    return rss_mb()

def stalled_bombs(path, content_type, inflated, n=1000, addresses=4, hold=8.0):
    bomb = gzip.compress(b" " * inflated, 9)
    socks, refused = [], 0
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: {content_type}\r\nContent-Encoding: gzip\r\n"
            "Transfer-Encoding: chunked\r\n\r\n").encode()
    chunk = b"%x\r\n" % len(bomb) + bomb + b"\r\n"
    for i in range(n):
        try:
            s = connect(i, addresses)
            s.sendall(head + chunk)
            socks.append(s)
        except OSError:
            refused += 1
    time.sleep(hold)
    statuses = {}
    for s in socks:
        try:
            s.settimeout(0.01)
            line = s.recv(64).split(b"\r\n")[0].decode(errors="replace")
            code = line.split(" ")[1] if line.startswith("HTTP/") else "open/closed"
        except OSError:
            code = "no answer"
        statuses[code] = statuses.get(code, 0) + 1
        s.close()
    if refused:
        statuses["connection refused/closed"] = refused
    return len(bomb), statuses

def batches(n=300, addresses=3, size=500_000):
    item = {"type": "track", "userId": "u", "event": "E", "context": {"groupId": "a"},
            "properties": {"pad": "x" * 1800}}
    one = len(json.dumps(item)) + 2
    body = json.dumps({"batch": [dict(item, messageId=None) for _ in range(size // one)]})
    auth = base64.b64encode(b"bench-key:").decode()
    statuses, lock = {}, threading.Lock()
    def send(i):
        try:
            s = connect(i, addresses)
            s.settimeout(60)
            payload = body.replace('"messageId": null', f'"messageId": "b{i}-x"', 1).encode()
            s.sendall((f"POST /v1/batch HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                       f"Authorization: Basic {auth}\r\nContent-Type: application/json\r\n"
                       f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n").encode() + payload)
            line = s.recv(64).split(b"\r\n")[0].decode(errors="replace")
            code = line.split(" ")[1] if line.startswith("HTTP/") else "no answer"
            s.close()
        except OSError as e:
            code = type(e).__name__
        with lock:
            statuses[code] = statuses.get(code, 0) + 1
    threads = [threading.Thread(target=send, args=(i,)) for i in range(n)]
    for t in threads: t.start()
    for t in threads: t.join()
    return len(body), statuses

print(f"server pid {pid}; idle RSS {rss_mb():.1f} MB")
for name, run in [
    ("1. 1,000 stalled gzip bombs (2 MB each) to POST /login, 4 addresses",
     lambda: stalled_bombs("/login", "application/x-www-form-urlencoded", 2_000_000)),
    ("2a. 1,000 stalled gzip bombs (2 MB each) to POST /v1/batch, no credentials, 4 addresses",
     lambda: stalled_bombs("/v1/batch", "application/json", 2_000_000)),
    # Just under limits.max_body_bytes once inflated, so not refused by size.
    ("2b. 1,000 stalled gzip bombs (490 KB each) to POST /v1/batch, no credentials, 4 addresses",
     lambda: stalled_bombs("/v1/batch", "application/json", 490_000)),
    ("3. 300 concurrent complete ~500 KB batches, 3 addresses",
     lambda: batches()),
]:
    idle = settle()
    with Sampler() as s:
        sent, statuses = run()
    print(f"{name}\n   body {sent} bytes; answers {statuses}\n"
          f"   idle {idle:.1f} MB, peak {s.peak:.1f} MB: +{s.peak - idle:.1f} MB above idle")
PY
