#!/usr/bin/env bash
# Checks the served OpenAPI document against the running server with
# schemathesis (no 5xx but the documented 501, every answer matches its
# schema): on SQLite, and on PostgreSQL when TEST_DATABASE_URL is set.
# Usage: tests/openapi/schemathesis.sh BINARY SCHEMATHESIS [MAX_EXAMPLES]
set -euo pipefail
bin=$(realpath "$1")
st=$2
examples=${3:-25}
token=schemathesis-admin-token-0123456789abcdef
port=18391
config=$(realpath "$(dirname "$0")/schemathesis.toml")
work=$(mktemp -d)
trap 'kill "${pid:-}" 2>/dev/null || true; rm -rf "$work"' EXIT

check() {
  local backend=$1 url=$2
  echo "== schemathesis on $backend"
  TD_STORAGE__URL="$url" TD_ADMIN__TOKEN="$token" TD_TOTANGO__SERVICE_ID=SP-1234-01 \
    TD_TOTANGO__ENDPOINT=http://127.0.0.1:9 TD_DELIVERY__MAX_RETRY_AGE_SECS=2 \
    "$bin" serve --listen "127.0.0.1:$port" >"$work/$backend.log" 2>&1 &
  pid=$!
  for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break
    sleep 0.1
  done
  local base="http://127.0.0.1:$port"
  # Some messages for the admin API to list, replay and erase.
  for i in 1 2 3; do
    curl -sf -X POST "$base/v1/track" -H 'content-type: application/json' \
      -d "{\"userId\":\"u$i\",\"event\":\"Used\",\"context\":{\"groupId\":\"acme\"}}" >/dev/null
  done
  curl -sf -H "Authorization: Bearer $token" "$base/api/openapi.json" >"$work/openapi.json"
  local common=(--url "$base" --max-examples "$examples" --no-color
    --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance)
  # The admin API with the operator's token; the ingest APIs without it
  # (open mode on loopback: any write key).
  "$st" --config-file "$config" run "$work/openapi.json" "${common[@]}" --include-path-regex '^/api/' \
    -H "Authorization: Bearer $token"
  "$st" --config-file "$config" run "$work/openapi.json" "${common[@]}" --exclude-path-regex '^/api/'
  kill "$pid"
  wait "$pid" || true
  if grep -q "panicked" "$work/$backend.log"; then
    echo "the server panicked on $backend:"; grep -A5 panicked "$work/$backend.log"; exit 1
  fi
}

check sqlite "sqlite://$work/td.db"
if [ -n "${TEST_DATABASE_URL:-}" ]; then
  # A database of its own on that server, dropped afterwards.
  db="td_schemathesis_$$"
  psql -q "$TEST_DATABASE_URL" -c "CREATE DATABASE $db"
  trap 'kill "${pid:-}" 2>/dev/null || true; rm -rf "$work"; psql -q "$TEST_DATABASE_URL" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)"' EXIT
  check postgres "${TEST_DATABASE_URL%/*}/$db"
fi
echo "schemathesis: ok"
