#!/usr/bin/env bash
# Instructions per check, counted by valgrind's callgrind: the one measure of a check's cost
# that other processes on a shared machine cannot move (callgrind counts instructions, not
# time; the same binary and inputs give the same count). Cache misses and syscalls are not
# counted, so read it next to the timed runs of scripts/bench.sh, not instead of them.
#
# Each server runs under callgrind on CPU $BENCH_SERVER_CPU (default 0, so audgate picks the
# runtime it uses on one CPU); the load generator sends realistic CheckRequests over 4
# connections for a warm-up, the counters are zeroed, then for --duration seconds, and the
# count is divided by the checks answered in that window.
#
# usage: scripts/bench-instructions.sh [--duration S] [--no-build]
# Needs target/bench from scripts/bench.sh (or: target/release/examples/loadgen setup --dir
# target/bench --envoy-template benches/envoy/bench.yaml). Ports 28191-28499 on 127.0.0.1.
# Output: target/bench/instructions.txt (raw INSTR lines) and a table on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=8 BUILD=1
while [ $# -gt 0 ]; do
  case "$1" in
    --duration) DURATION=$2; shift ;;
    --no-build) BUILD=0 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "bench-instructions.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
command -v valgrind >/dev/null || { echo "needs valgrind (apt-get install valgrind)" >&2; exit 2; }
[ "$BUILD" = 1 ] && cargo build --release --examples --bins >&2
REL=target/release OUT=target/bench CPU=${BENCH_SERVER_CPU:-0}
[ -f "$OUT/audgate.yaml" ] || "$REL/examples/loadgen" setup --dir "$OUT" --memory-tokens 10 \
  --envoy-template benches/envoy/bench.yaml >&2
RESULTS=$OUT/instructions.txt
: > "$RESULTS"
PID=

cleanup() { if [ -n "$PID" ]; then kill "$PID" 2>/dev/null || true; fi; }
trap cleanup EXIT

# A copy of an audgate config from target/bench with its three listeners moved to BASE+0..2.
config_on() { # SOURCE BASE -> path
  local out="$OUT/instr-$2.yaml"
  python3 - "$1" "$2" "$out" <<'PY'
import re, sys
src, base, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
text = open(src).read()
for i, key in enumerate(["grpc", "http", "admin"]):
    text = re.sub(rf"(\n  {key}: 127\.0\.0\.1:)\d+", rf"\g<1>{base + i}", text, count=1)
open(out, "w").write(text)
PY
  echo "$out"
}

measure() { # LABEL PORT TOKENS -- COMMAND...
  local label=$1 port=$2 tokens=$3; shift 4
  local dump="$OUT/callgrind.$label"
  rm -f "$dump" "$dump".*
  taskset -c "$CPU" valgrind --tool=callgrind --callgrind-out-file="$dump" "$@" >"$OUT/instr-$label.log" 2>&1 &
  PID=$!
  for _ in $(seq 1 300); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.1
  done
  sleep 2 # keys loaded
  "$REL/examples/loadgen" run --label warmup --target "127.0.0.1:$port" --tokens "$OUT/$tokens" \
    --connections 4 --duration 3 --warmup 0 >/dev/null 2>&1
  callgrind_control -z "$PID" >/dev/null
  local result
  result=$("$REL/examples/loadgen" run --label "$label" --target "127.0.0.1:$port" --tokens "$OUT/$tokens" \
    --connections 4 --duration "$DURATION" --warmup 0 2>/dev/null | grep '^RESULT')
  callgrind_control -d "$PID" >/dev/null
  sleep 1
  kill "$PID"; wait "$PID" 2>/dev/null || true; PID=
  local checks ok ir
  checks=$(echo "$result" | grep -o ' checks=[0-9]*' | cut -d= -f2)
  ok=$(echo "$result" | grep -o ' failed=[0-9]*' | cut -d= -f2)
  ir=$(grep -h '^totals:' "$dump".* | awk '{ s += $2 } END { printf "%.0f", s }')
  echo "INSTR label=$label checks=$checks failed=$ok instructions=$ir per_check=$(awk -v i="$ir" -v c="$checks" 'BEGIN { printf "%.0f", i / c }')" | tee -a "$RESULTS" >&2
}

measure floor 28291 tokens-rs256-1.txt -- "$REL/examples/allow_all" --listen 127.0.0.1:28291
measure cached 28191 tokens-rs256-1.txt -- "$REL/audgate" serve --config "$(config_on "$OUT/audgate.yaml" 28191)"
measure uncached-RS256 28391 tokens-rs256-1.txt -- "$REL/audgate" serve --config "$(config_on "$OUT/audgate-nocache.yaml" 28391)"
LOGALL=$(config_on "$OUT/audgate.yaml" 28491)
printf 'logging:\n  decisions: all\n' >> "$LOGALL"
measure cached-logall 28491 tokens-rs256-1.txt -- "$REL/audgate" serve --config "$LOGALL"
measure v-lean 28494 tokens-rs256-1.txt -- "$REL/examples/serve_variant" --config "$(config_on "$OUT/audgate.yaml" 28494)" --log warn --metrics off

python3 - "$RESULTS" <<'PY'
import sys
rows = [dict(kv.split("=", 1) for kv in line.split()[1:]) for line in open(sys.argv[1])]
floor = next(int(r["per_check"]) for r in rows if r["label"] == "floor")
print("Instructions per check (callgrind; servers on one CPU, 4 connections, same CheckRequest):")
print(f"  {'server':<16}{'checks':>8}{'failed':>8}{'instr/check':>13}{'x floor':>9}{'- floor':>9}")
for r in rows:
    n = int(r["per_check"])
    print(f"  {r['label']:<16}{r['checks']:>8}{r['failed']:>8}{n:>13,}{n / floor:>9.2f}{n - floor:>9,}")
PY
