# Helpers shared by bench/whole_path.sh and bench/profile.sh (sourced, not run).
#
# The caller sets `work` (a temp dir), TARGET (the cargo target dir) and BIN,
# calls bench_traps (cleanup on exit, Ctrl-C or SIGTERM), and starts processes only through these
# functions, so that every process and database it made is gone on exit.

TARGET=${CARGO_TARGET_DIR:-target}
BIN=${BIN:-$TARGET/release/totango-destination}
FAKE=${FAKE:-$TARGET/release/examples/fake_totango}
PG_URL=${BENCH_DATABASE_URL:-${TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}}
ADMIN=${ADMIN:-bench-admin-token-0123456789abcdef}

bench_server_pid=""
bench_fake_pid=""
bench_databases=()

# need_tools TOOL...: fail at once, naming what is missing.
need_tools() {
  local tool
  for tool in "$@"; do
    command -v "$tool" >/dev/null || { echo "bench: needs $tool (apt-get install $tool)" >&2; exit 1; }
  done
}

stop_server() {
  if [ -n "$bench_server_pid" ]; then
    kill "$bench_server_pid" 2>/dev/null || true
    wait "$bench_server_pid" 2>/dev/null || true
  fi
  bench_server_pid=""
}

stop_fake() {
  if [ -n "$bench_fake_pid" ]; then
    kill "$bench_fake_pid" 2>/dev/null || true
    wait "$bench_fake_pid" 2>/dev/null || true
  fi
  bench_fake_pid=""
}

# bench_traps: clean up on exit, also when interrupted or terminated.
bench_traps() {
  trap bench_cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM HUP
}

bench_cleanup() {
  stop_server
  stop_fake
  local db
  for db in "${bench_databases[@]}"; do
    psql -q "$PG_URL" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
  done
  [ -n "${work:-}" ] && rm -rf "$work"
}

# shellcheck disable=SC2034  # storage_url is read by the caller
# fresh_storage sqlite|postgres: sets storage_url to a new SQLite file in $work
# or a new PostgreSQL database on $PG_URL's server (dropped on exit).
fresh_storage() {
  local name base query=""
  name="td_bench_$(date +%s%N | tail -c 9)_$RANDOM"
  case $1 in
    sqlite) storage_url="sqlite://$work/$name.db" ;;
    postgres)
      psql -q "$PG_URL" -c "CREATE DATABASE $name" >/dev/null
      bench_databases+=("$name")
      base=${PG_URL%%\?*}
      [ "$base" != "$PG_URL" ] && query="?${PG_URL#*\?}"
      storage_url="${base%/*}/$name$query"
      ;;
    *) echo "bench: unknown backend $1 (sqlite, postgres)" >&2; exit 1 ;;
  esac
}

# wait_http URL PID: until URL answers 2xx, or fail if PID exits or
# WAIT_SECS (default 30) pass.
wait_http() {
  local _
  for _ in $(seq $((${WAIT_SECS:-30} * 20))); do
    curl -fsS "$1" >/dev/null 2>&1 && return 0
    kill -0 "$2" 2>/dev/null || break
    sleep 0.05
  done
  echo "bench: $1 did not answer" >&2
  return 1
}

# start_fake PORT DELAY_MS: the fake Totango (examples/fake_totango.rs).
start_fake() {
  "$FAKE" "127.0.0.1:$1" --delay-ms "$2" 2>>"$work/fake.log" &
  bench_fake_pid=$!
  wait_http "http://127.0.0.1:$1/count" "$bench_fake_pid"
}

# start_server PORT STORAGE_URL ENDPOINT [VAR=VALUE...]: the server with the
# default configuration, plus the given variables. Set WRAP (e.g. a valgrind
# command line) to run it under a tool.
start_server() {
  local port=$1 url=$2 endpoint=$3
  shift 3
  # WRAP is a command line: split on purpose.
  # shellcheck disable=SC2086
  env TD_TOTANGO__SERVICE_ID=SP-1234-01 TD_TOTANGO__ENDPOINT="$endpoint" \
    TD_STORAGE__URL="$url" TD_ADMIN__TOKEN="$ADMIN" RUST_LOG=warn "$@" \
    ${WRAP:-} "$BIN" serve --listen "127.0.0.1:$port" >>"$work/server.log" 2>&1 &
  bench_server_pid=$!
  wait_http "http://127.0.0.1:$port/readyz" "$bench_server_pid" || { tail -20 "$work/server.log" >&2; exit 1; }
}

# metric PORT NAME [LABEL_FILTER]: sum of a Prometheus series from /metrics.
metric() {
  curl -fsS "http://127.0.0.1:$1/metrics" |
    awk -v name="$2" -v filter="${3:-}" '
      index($0, name) == 1 && (substr($0, length(name) + 1, 1) ~ /[ {]/) && (filter == "" || index($0, filter)) { s += $NF }
      END { printf "%.0f\n", s }'
}

fake_count() { curl -fsS "http://127.0.0.1:$1/count" 2>/dev/null || echo 0; }

# peak_rss PID: VmHWM in MB.
peak_rss() { awk '/VmHWM/ {printf "%.0f", $2 / 1024}' "/proc/$1/status"; }

# wrk_field OUTPUT: requests/s, completed requests, seconds, non-2xx of a wrk run.
wrk_rps() { awk '/Requests\/sec/ {print $2}' <<<"$1"; }
wrk_requests() { awk '/requests in/ {print $1}' <<<"$1"; }
wrk_secs() { awk '/requests in/ {sub(/,$/, "", $4); v = $4; if (v ~ /ms$/) v = v / 1000; else if (v ~ /m$/) v = v * 60; else v = v + 0; print v}' <<<"$1"; }
wrk_non2xx() { awk '/Non-2xx/ {n = $NF} END {print n + 0}' <<<"$1"; }

median() { sort -g | awk '{a[NR] = $1} END {if (NR == 0) print "-"; else print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}'; }

# stored_messages PORT: messages the storage holds, every state (the admin
# API's /api/stats outcomes): what was committed, whether or not the client saw
# its answer (a client that disconnects mid-request can leave a commit that the
# td_messages_accepted_total counter never hears of).
stored_messages() {
  curl -fsS -H "Authorization: Bearer $ADMIN" "http://127.0.0.1:$1/api/stats" |
    python3 -c 'import json, sys; print(sum(json.load(sys.stdin)["outcomes"].values()))'
}

# cpu_secs PID: user + system CPU seconds the process has used so far.
cpu_secs() { awk -v hz="$(getconf CLK_TCK)" '{print ($14 + $15) / hz}' "/proc/$1/stat"; }

# postgres_cpu_secs: CPU seconds used so far by every process named postgres on
# this machine (the server's backends for this bench, and any other client's).
postgres_cpu_secs() {
  local pid
  for pid in $(pgrep -x postgres || true); do cat "/proc/$pid/stat" 2>/dev/null || true; done |
    awk -v hz="$(getconf CLK_TCK)" '{s += $14 + $15} END {printf "%.2f\n", s / hz}'
}
