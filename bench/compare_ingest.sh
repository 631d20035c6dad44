#!/usr/bin/env bash
# Compares the durable ingest of two builds in one run, alternating them so
# that machine noise hits both alike: POST /v1/track at 64 connections, and its
# ratio to GET /healthz measured in the same round.
#
#   bash bench/compare_ingest.sh OLD_BINARY [NEW_BINARY] [ROUNDS]
#
# NEW_BINARY defaults to target/release/totango-destination. Prints each
# round and the medians.
set -euo pipefail
cd "$(dirname "$0")/.."
old=${1:?usage: compare_ingest.sh OLD_BINARY [NEW_BINARY] [ROUNDS]}
new=${2:-target/release/totango-destination}
rounds=${3:-3}
export DURATION=${DURATION:-5s}
median() { sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
declare -A rps ratio
for r in $(seq "$rounds"); do
  for which in old new; do
    bin=$old; [ "$which" = new ] && bin=$new
    out=$(BIN="$bin" bash bench/ingest.sh 2>&1)
    c64=$(awk -F' [|] ' '$1=="64" {print $2}' <<<"$out")
    q=$(awk -F': ' '/÷ GET \/healthz/ {print $2}' <<<"$out")
    echo "round $r $which: POST /v1/track at 64 connections $c64 requests/s, ratio to /healthz $q"
    rps[$which]+="$c64 "; ratio[$which]+="$q "
  done
done
for which in old new; do
  echo "$which median: $(tr ' ' '\n' <<<"${rps[$which]}" | grep . | median) requests/s, ratio $(tr ' ' '\n' <<<"${ratio[$which]}" | grep . | median)"
done
