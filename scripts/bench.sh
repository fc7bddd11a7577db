#!/usr/bin/env bash
# audgate benchmarks (issue 6), one command: builds in release mode, then
#   1. criterion micro-benchmarks of the decision core          (benches/core.rs)
#   2. gRPC load straight to the ext_authz port, side by side with an allow-all floor server
#      built by the bench (examples/allow_all.rs), by our own load generator (examples/loadgen.rs)
#   3. end to end through real Envoy with wrk: no auth, jwt_authn, jwt_authn + jwt_cache_config,
#      ext_authz -> allow-all, ext_authz -> audgate, ext_authz -> an allow-all answering like
#      audgate (Envoy's own share of applying the answer), over http_service: allow-all HTTP, audgate's
#      HTTP endpoint, and audgate in process (the Envoy dynamic module, the same config file),
#      all listeners of one Envoy                                   (benches/envoy/bench.yaml);
#      then p50 latency at 1 connection for no auth, jwt_authn + cache, ext_authz -> audgate
#      and the module (issue 13's targets)
#   4. memory: audgate's RSS idle and under load with 100,000 distinct tokens
#   5. with --instructions: instructions per check under callgrind, floor vs audgate, and
#      Envoy's per request with no auth, jwt_authn + cache, the module and ext_authz to the
#      floor, to audgate and to the floor answering like audgate
#      (scripts/bench-instructions.sh): the measure that other load on the machine cannot move
# and prints one table of medians over --rounds rounds, as ratios against the baselines of the
# same run. Variants take turns within each round, so machine noise spreads over all of them.
#
# Placement: every server (audgate, the floor, Envoy) on CPU $BENCH_SERVER_CPU (default 0), the
# load (loadgen, wrk) on CPU $BENCH_LOAD_CPU (default 1), with taskset. Loopback only; ports
# 27100-27105, 27110-27112, 27191-27192, 27291-27293, 27391-27392, 27401-27442, 27481-27482, 27591-27592, 27901-27909, 27915-27916.
#
# usage: scripts/bench.sh [--rounds N] [--duration S] [--quick] [--no-build]
#                         [--skip-micro] [--skip-grpc] [--skip-envoy] [--skip-memory]
#                         [--listeners L1,L2,..] [--variants] [--instructions] [--memory-tokens N]
#                         [--open-rate CHECKS_PER_S] [--table RESULTS]
# --listeners: the Envoy listeners to drive (default all: noauth, jwt_authn, jwt_authn-cache,
# ext_authz-floor, ext_authz-audgate, ext_authz-floor-rich, http-floor, http-audgate, module); scripts/bench-module.sh
# runs the module's four.
# Results: target/bench/summary.txt (the table), target/bench/results.txt (raw lines),
# target/bench/*.log (server logs), target/bench/criterion.txt.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=3 DURATION=10 WARMUP=2 MEM_DURATION=20 CONNS=32 MEMORY_TOKENS=100000 OPEN_RATE=5000
BUILD=1 MICRO=1 GRPC=1 ENVOY=1 MEMORY=1 VARIANTS=0 INSTRUCTIONS=0 TABLE_ONLY=
LISTENERS=noauth,jwt_authn,jwt_authn-cache,ext_authz-floor,ext_authz-audgate,ext_authz-floor-rich,http-floor,http-audgate,module
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) ROUNDS=$2; shift ;;
    --duration) DURATION=$2; shift ;;
    --quick) ROUNDS=1 DURATION=3 WARMUP=1 MEM_DURATION=8 ;;
    --no-build) BUILD=0 ;;
    --skip-micro) MICRO=0 ;;
    --skip-grpc) GRPC=0 ;;
    --skip-envoy) ENVOY=0 ;;
    --skip-memory) MEMORY=0 ;;
    --variants) VARIANTS=1 ;;
    --listeners) LISTENERS=$2; shift ;;
    --instructions) INSTRUCTIONS=1 ;;
    --memory-tokens) MEMORY_TOKENS=$2; shift ;;
    --open-rate) OPEN_RATE=$2; shift ;;
    --table) TABLE_ONLY=$2; shift ;;
    -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
    *) echo "bench.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

SERVER_CPU=${BENCH_SERVER_CPU:-0}
LOAD_CPU=${BENCH_LOAD_CPU:-1}

table() { # RESULTS -> the table on stdout
python3 - "$1" "$SERVER_CPU" "$LOAD_CPU" "$CONNS" <<'PY'

import re, statistics, sys

path, server_cpu, load_cpu, conns = sys.argv[1:5]
rows = {"RESULT": [], "COST": [], "WRK": [], "WRK1": [], "MEM": [], "CACHE": [], "MACHINE": [], "ENTRY": [], "BOUNDED": [], "CRIT": []}
for line in open(path):
    kind, _, rest = line.strip().partition(" ")
    if kind in rows:
        rows[kind].append(dict(kv.split("=", 1) for kv in rest.split() if "=" in kv))

def med(xs):
    xs = [x for x in xs if x == x]
    return statistics.median(xs) if xs else float("nan")

def f(x, spec):
    return "-" if x != x else format(x, spec)

machine = {k: v for r in rows["MACHINE"] for k, v in r.items()}
out = []
p = out.append
rounds = sorted(({r["round"] for r in rows["RESULT"]} | {r["round"] for r in rows["WRK"]}) - {"0"})
targets13 = []
p(f"audgate benchmarks: medians over {len(rounds)} round(s) of one run, ratios against baselines of the same run")
p(f"machine: {machine.get('nproc', '?')} CPUs, load average {machine.get('loadavg_start', '?')} at start, "
  f"{machine.get('loadavg_end', '?')} at end; servers on CPU {server_cpu}, load on CPU {load_cpu}")
targets = []

if rows["CRIT"]:
    p("")
    p(f"Micro-benchmarks (criterion, median of its samples; pinned to CPU {server_cpu}):")
    for r in rows["CRIT"]:
        ns = float(r["median_ns"])
        p(f"  {r['name']:<48}{ns / 1000:>10.3f} µs")

cost = {r["alg"]: r for r in rows["COST"]}
if cost:
    p("")
    p("Decision core in process (loadgen cost; authz::evaluate, one call):")
    p(f"  {'alg':<8}{'uncached µs':>13}{'cached µs':>11}{'saved by cache µs':>19}")
    for alg, r in cost.items():
        p(f"  {alg.upper() if alg != 'eddsa' else 'EdDSA':<8}{float(r['uncached_us']):>13.2f}{float(r['cached_us']):>11.2f}{float(r['verify_us']):>19.2f}")

res = rows["RESULT"]
if res:
    by_round = {}
    for r in res:
        by_round.setdefault(r["round"], {})[r["label"]] = r
    labels = []
    for r in res:
        if r["label"] not in labels:
            labels.append(r["label"])
    def per_round(label, fn, base="floor"):
        vals = []
        for rnd, rs in by_round.items():
            if label in rs and base in rs:
                vals.append(fn(rs[label], rs[base]))
        return med(vals)
    def floor_of(label):  # the open-loop rows compare with the floor at the same rate
        return "floor-open" if label.endswith("-open") else "floor"
    p("")
    p(f"gRPC straight to the ext_authz port ({conns} HTTP/2 connections, 1 check in flight on each; ~2.4 KB CheckRequest):")
    p(f"  {'variant':<16}{'checks/s':>10}{'x floor':>9}{'CPU µs/check':>14}{'x floor':>9}{'p50 µs':>9}{'p99 µs':>9}{'p999 µs':>9}{'p99-floor':>11}{'srv util':>10}{'cli util':>10}")
    for label in labels:
        rs = [r for r in res if r["label"] == label]
        g = lambda k: med([float(r[k]) for r in rs])
        base = floor_of(label)
        x_rps = per_round(label, lambda a, b: float(a["rps"]) / float(b["rps"]), base)
        x_cpu = per_round(label, lambda a, b: float(a["server_cpu_us"]) / float(b["server_cpu_us"]), base)
        d99 = per_round(label, lambda a, b: float(a["p99_us"]) - float(b["p99_us"]), base)
        p(f"  {label:<16}{g('rps'):>10.0f}{f(x_rps, '.2f'):>9}{g('server_cpu_us'):>14.2f}{f(x_cpu, '.2f'):>9}"
          f"{g('p50_us'):>9.0f}{g('p99_us'):>9.0f}{g('p999_us'):>9.0f}{f(d99, '+.0f'):>11}{g('server_util'):>10.2f}{g('client_util'):>10.2f}")
    if "cached" in labels:
        x = per_round("cached", lambda a, b: float(a["server_cpu_us"]) / float(b["server_cpu_us"]))
        targets.append(("cached check: server CPU/check <= 1.15x floor", f"{x:.2f}x", x <= 1.15))
        d = per_round("cached", lambda a, b: float(a["p99_us"]) - float(b["p99_us"]))
        targets.append((f"p99 added over the floor at {conns} connections <= 50 µs (cached, saturated)", f"{d:+.0f} µs", d <= 50))
    if "cached-logall" in labels:
        x = per_round("cached-logall", lambda a, b: float(a["server_cpu_us"]) / float(b["server_cpu_us"]))
        targets.append(("cached check with logging.decisions: all: server CPU/check <= 1.30x floor", f"{x:.2f}x", x <= 1.30))
    if "cached-open" in labels:
        d = per_round("cached-open", lambda a, b: float(a["p99_us"]) - float(b["p99_us"]), "floor-open")
        rate = next(r.get("rate", "?") for r in res if r["label"] == "cached-open")
        targets.append((f"p99 added over the floor at {conns} connections <= 50 µs (cached, open loop at {rate}/s)", f"{d:+.0f} µs", d <= 50))
    if "uncached-RS256" in labels and "rs256" in cost:
        verify = float(cost["rs256"]["verify_us"])
        x = per_round("uncached-RS256", lambda a, b: float(a["server_cpu_us"]) / (float(b["server_cpu_us"]) + verify))
        targets.append((f"uncached RS256: CPU/check <= 1.15x (floor + {verify:.1f} µs verify)", f"{x:.2f}x", x <= 1.15))
        d = per_round("uncached-RS256", lambda a, b: float(a["p99_us"]) - float(b["p99_us"]))
        targets.append((f"p99 added over the floor at {conns} connections (uncached RS256, for information)", f"{d:+.0f} µs", None))

def wrk(file):
    text = open(file).read()
    unit = {"us": 1.0, "ms": 1000.0, "s": 1e6}
    lat = {m.group(1): float(m.group(2)) * unit[m.group(3)]
           for m in re.finditer(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)}
    reqs = int(re.search(r"(\d+) requests in", text).group(1))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    errs = re.search(r"Socket errors: (.*)", text)
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1)), "reqs": reqs,
            "p50": lat.get("50", float("nan")), "p99": lat.get("99", float("nan")),
            "bad": int(bad.group(1)) if bad else 0, "errs": errs.group(1) if errs else ""}

if rows["WRK"]:
    data = []
    for r in rows["WRK"]:
        w = wrk(r["file"])
        w.update(label=r["label"], round=r["round"],
                 cpu=(float(r["envoy_cpu_s"]) + float(r["authz_cpu_s"])) / max(w["reqs"], 1) * 1e6)
        data.append(w)
    labels = []
    for w in data:
        if w["label"] not in labels:
            labels.append(w["label"])
    def ratio(a, b, key="rps"):
        vals = []
        for rnd in {w["round"] for w in data}:
            x = [w for w in data if w["round"] == rnd and w["label"] == a]
            y = [w for w in data if w["round"] == rnd and w["label"] == b]
            if x and y:
                vals.append(x[0][key] / y[0][key])
        return med(vals)
    p("")
    p(f"Through Envoy (1 worker; Envoy and the authorizer on CPU {server_cpu}, wrk -c{conns} on CPU {load_cpu}; direct_response):")
    p(f"  {'listener':<19}{'req/s':>9}{'x no-auth':>11}{'CPU µs/req':>12}{'p50 µs':>9}{'p99 µs':>9}{'non-2xx':>9}")
    for label in labels:
        ws = [w for w in data if w["label"] == label]
        p(f"  {label:<19}{med([w['rps'] for w in ws]):>9.0f}{f(ratio(label, 'noauth'), '.2f'):>11}"
          f"{med([w['cpu'] for w in ws]):>12.1f}{med([w['p50'] for w in ws]):>9.0f}{med([w['p99'] for w in ws]):>9.0f}"
          f"{sum(w['bad'] for w in ws):>9}")
    if "module" in labels:
        x = ratio("module", "noauth")
        targets13.append(("in process (module), cached token, >= 0.85x no auth", f"{x:.2f}x", x >= 0.85))
        if "jwt_authn-cache" in labels:
            x = ratio("module", "jwt_authn-cache")
            targets13.append(("module >= 1.0x jwt_authn with jwt_cache_config", f"{x:.2f}x", x >= 1.0))
        if "ext_authz-audgate" in labels:
            x = ratio("module", "ext_authz-audgate")
            targets13.append(("module >= 2.5x ext_authz -> audgate (same config)", f"{x:.2f}x", x >= 2.5))
    if "ext_authz-audgate" in labels and "ext_authz-floor" in labels:
        x = ratio("ext_authz-audgate", "ext_authz-floor")
        targets.append(("Envoy: audgate >= 0.95x ext_authz to allow-all", f"{x:.2f}x", x >= 0.95))
        if "jwt_authn" in labels:
            x = ratio("ext_authz-audgate", "jwt_authn")
            targets.append(("Envoy: audgate >= 1.15x jwt_authn without cache", f"{x:.2f}x", x >= 1.15))
        if "jwt_authn-cache" in labels:
            x = ratio("ext_authz-audgate", "jwt_authn-cache")
            targets.append(("Envoy: audgate vs jwt_authn with jwt_cache_config (for information)", f"{x:.2f}x", None))
    if "ext_authz-floor-rich" in labels and "ext_authz-audgate" in labels:
        x = ratio("ext_authz-audgate", "ext_authz-floor-rich")
        targets.append(("Envoy: audgate vs allow-all answering like audgate (for information)", f"{x:.2f}x", None))
    if "http-audgate" in labels and "http-floor" in labels:
        x = ratio("http-audgate", "http-floor")
        targets.append(("Envoy http_service: audgate's HTTP endpoint vs allow-all HTTP (for information)", f"{x:.2f}x", None))

if rows["WRK1"]:
    one = []
    for r in rows["WRK1"]:
        w = wrk(r["file"])
        w.update(label=r["label"], round=r["round"])
        one.append(w)
    labels1 = []
    for w in one:
        if w["label"] not in labels1:
            labels1.append(w["label"])
    def added(a, key):  # per round: a's latency minus no auth's, then the median
        vals = []
        for rnd in {w["round"] for w in one}:
            x = [w for w in one if w["round"] == rnd and w["label"] == a]
            y = [w for w in one if w["round"] == rnd and w["label"] == "noauth"]
            if x and y:
                vals.append(x[0][key] - y[0][key])
        return med(vals)
    p("")
    p(f"Through Envoy at 1 connection (wrk -c1; latency, not throughput):")
    p(f"  {'listener':<19}{'req/s':>9}{'p50 µs':>9}{'+p50 µs':>9}{'p99 µs':>9}{'+p99 µs':>9}{'non-2xx':>9}")
    for label in labels1:
        ws = [w for w in one if w["label"] == label]
        p(f"  {label:<19}{med([w['rps'] for w in ws]):>9.0f}{med([w['p50'] for w in ws]):>9.1f}"
          f"{f(added(label, 'p50'), '+.1f'):>9}{med([w['p99'] for w in ws]):>9.1f}{f(added(label, 'p99'), '+.1f'):>9}"
          f"{sum(w['bad'] for w in ws):>9}")
    if "module" in labels1 and "noauth" in labels1:
        d = added("module", "p50")
        targets13.append(("module: p50 added over no auth at 1 connection <= 20 µs", f"{d:+.1f} µs", d <= 20))

mem = {r["label"]: r for r in rows["MEM"]}
if mem:
    p("")
    p("Memory (VmRSS / VmHWM):")
    for label, r in mem.items():
        p(f"  {label:<28}{int(r['rss_kib']) / 1024:>8.1f} MiB  (peak {int(r['hwm_kib']) / 1024:.1f} MiB)")
    for r in rows["CACHE"]:
        hits, misses = float(r.get("hits") or 0), float(r.get("misses") or 0)
        p(f"  token cache since start: {hits:.0f} hits, {misses:.0f} misses")
    for r in rows["ENTRY"]:
        p(f"  one cache entry ({r['payload_json_bytes']}-byte payload): {r['heap_bytes_per_entry']} bytes of heap, "
          f"weighed as {r['weighed_bytes_per_entry']}")
    for r in rows["BOUNDED"]:
        p(f"  default cap ({int(r['max_bytes']) >> 20} MiB weighed) after {r['tokens']} tokens: {r['entries']} entries, "
          f"{int(r['live_heap_bytes']) / 2**20:.1f} MiB of heap ({float(r['heap_over_cap']):.2f}x the cap)")
    if "audgate-under-load" in mem:
        peak = int(mem["audgate-under-load"]["hwm_kib"]) / 1024
        targets.append(("RSS under the 100k-token load <= 64 MiB (peak)", f"{peak:.1f} MiB", peak <= 64))

for title, ts in (("Targets (issues 6 and 11):", targets), ("Targets (issue 13, audgate in process):", targets13)):
    if ts:
        p("")
        p(title)
        for what, value, ok in ts:
            verdict = "info" if ok is None else ("MET" if ok else "MISSED")
            p(f"  {verdict:<7}{what}: {value}")
print("\n".join(out))
PY
}

if [ -n "$TABLE_ONLY" ]; then table "$TABLE_ONLY"; exit 0; fi
OUT=target/bench
REL=${CARGO_TARGET_DIR:-target}/release
mkdir -p "$OUT"
RESULTS=$OUT/results.txt
: > "$RESULTS"

need() { command -v "$1" >/dev/null 2>&1; }
need taskset || { echo "bench.sh: taskset (util-linux) is needed" >&2; exit 1; }
need curl || { echo "bench.sh: curl is needed" >&2; exit 1; }
need python3 || { echo "bench.sh: python3 is needed (for the table)" >&2; exit 1; }
if [ "$ENVOY" = 1 ]; then
  if ! need wrk; then
    if [ "$(id -u)" = 0 ]; then
      apt-get install -y wrk >/dev/null || { apt-get update >/dev/null && apt-get install -y wrk >/dev/null; }
    else
      echo "bench.sh: wrk is needed (apt-get install wrk), or pass --skip-envoy" >&2; exit 1
    fi
  fi
  if [ -n "${AUDGATE_BENCH_ENVOY:-}" ]; then ENVOY_BIN=$AUDGATE_BENCH_ENVOY
  elif [ -x /opt/envoy-venv/bin/envoy ]; then ENVOY_BIN=/opt/envoy-venv/bin/envoy
  else . scripts/envoy-env.sh; ENVOY_BIN=$AUDGATE_TEST_ENVOY
  fi
fi

for port in 27100 27101 27102 27103 27104 27105 27110 27111 27112 27191 27292 27293 27291 27391 27481 27591 27901 27902 27909 27915 27916; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "bench.sh: port $port is already in use on 127.0.0.1" >&2; exit 1
  fi
done

if [ "$BUILD" = 1 ]; then
  echo "== building (release)" >&2
  cargo build --release --examples --bins
  [ "$ENVOY" = 1 ] && cargo build --release -p audgate-envoy
  if [ "$MICRO" = 1 ]; then cargo bench --bench core --no-run; fi
fi

PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

# start NAME CMD...: run on the server CPU, log to $OUT/NAME.log, remember the pid in $STARTED
start() {
  local name=$1; shift
  taskset -c "$SERVER_CPU" "$@" >"$OUT/$name.log" 2>&1 &
  STARTED=$!
  PIDS+=("$STARTED")
}
wait_port() {
  for _ in $(seq 1 200); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "bench.sh: nothing listens on 127.0.0.1:$1" >&2; return 1
}
wait_ready() { # URL
  for _ in $(seq 1 200); do
    if curl -sf -o /dev/null "$1"; then return 0; fi
    sleep 0.1
  done
  echo "bench.sh: $1 never became ready" >&2; return 1
}
cpu_ticks() { # PID -> utime + stime in clock ticks
  awk '{ sub(/.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"
}
rss_kib() { # PID FIELD (VmRSS | VmHWM)
  awk -v f="$2:" '$1 == f { print $2 }' "/proc/$1/status"
}
TCK=$(getconf CLK_TCK)

echo "== setup: keys, tokens, configs" >&2
[ "$MEMORY" = 1 ] || MEMORY_TOKENS=10 # the 100k tokens are only for the memory part
# audgate-12mib: a 12 MiB weighed cap holds about the heap an honest weigher would allow under
# the default 32 MiB (examples/cache_memory.rs: an entry weighs ~0.36x its real heap)
CONFIGS="audgate:default:27191,27192,27901;audgate-nocache:off:27391,27392,27902;audgate-12mib:12MiB:27591,27592,27915"
# What audgate serve does, one choice changed at a time (examples/serve_variant.rs); v-lean has
# no decision line and no metrics at all
VARIANT_NAMES=(v-multi v-synclog v-nolog v-lean)
VARIANT_ARGS=("--runtime multi" "--log-writer stderr" "--log warn" "--log warn --metrics off")
if [ "$VARIANTS" = 1 ]; then
  for i in "${!VARIANT_NAMES[@]}"; do
    CONFIGS="$CONFIGS;${VARIANT_NAMES[$i]}:default:$((27401 + 10 * i)),$((27402 + 10 * i)),$((27903 + i))"
  done
fi
taskset -c "$LOAD_CPU" "$REL/examples/loadgen" setup --dir "$OUT" --memory-tokens "$MEMORY_TOKENS" \
  --envoy-template benches/envoy/bench.yaml --configs "$CONFIGS" | tee -a "$RESULTS"

echo "machine: $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)); load average $(cut -d' ' -f1-3 /proc/loadavg)" | tee "$OUT/machine.txt"
echo "MACHINE nproc=$(nproc) loadavg_start=$(cut -d' ' -f1 /proc/loadavg)" >> "$RESULTS"

# ---------------------------------------------------------------------------------------- micro
if [ "$MICRO" = 1 ]; then
  echo "== criterion micro-benchmarks (pinned to CPU $SERVER_CPU)" >&2
  touch "$OUT/criterion.start"
  taskset -c "$SERVER_CPU" cargo bench --bench core -- --warm-up-time 1 --measurement-time 3 \
    > "$OUT/criterion.txt" 2>&1 || { tail -20 "$OUT/criterion.txt" >&2; exit 1; }
  # criterion's own median estimate of each benchmark run just now
  find target/criterion -path '*/new/estimates.json' -newer "$OUT/criterion.start" | sort | while read -r f; do
    name=${f#target/criterion/}; name=${name%/new/estimates.json}
    echo "CRIT name=$name median_ns=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["median"]["point_estimate"])' "$f")"
  done | tee -a "$RESULTS" >&2
fi

# ------------------------------------------------------------------------------------- servers
if [ "$GRPC" = 1 ] || [ "$ENVOY" = 1 ] || [ "$MEMORY" = 1 ]; then
  echo "== starting servers on CPU $SERVER_CPU" >&2
  start allow_all "$REL/examples/allow_all" --listen 127.0.0.1:27291 --http 127.0.0.1:27292; FLOOR_PID=$STARTED
  start allow_all-rich "$REL/examples/allow_all" --listen 127.0.0.1:27293 --rich; RICH_PID=$STARTED
  # audgate serve as shipped: default logging (a decision line for each denial, none for an
  # allow; stderr to /dev/null here), metrics on
  taskset -c "$SERVER_CPU" "$REL/audgate" serve --config "$OUT/audgate.yaml" 2>/dev/null &
  AUDGATE_PID=$!; PIDS+=("$AUDGATE_PID")
  taskset -c "$SERVER_CPU" "$REL/audgate" serve --config "$OUT/audgate-nocache.yaml" 2>/dev/null &
  NOCACHE_PID=$!; PIDS+=("$NOCACHE_PID")
  # the same with a decision line for every check (`logging.decisions: all`), to /dev/null
  sed -e 's/127.0.0.1:27191/127.0.0.1:27481/; s/127.0.0.1:27192/127.0.0.1:27482/; s/127.0.0.1:27901/127.0.0.1:27916/' \
    "$OUT/audgate.yaml" > "$OUT/audgate-logall.yaml"
  printf 'logging:\n  decisions: all\n' >> "$OUT/audgate-logall.yaml"
  taskset -c "$SERVER_CPU" "$REL/audgate" serve --config "$OUT/audgate-logall.yaml" 2>/dev/null &
  LOGALL_PID=$!; PIDS+=("$LOGALL_PID")
  wait_port 27291; wait_port 27293
  wait_ready http://127.0.0.1:27901/readyz
  wait_ready http://127.0.0.1:27902/readyz
  wait_ready http://127.0.0.1:27916/readyz
  sleep 1
  echo "MEM label=audgate-idle rss_kib=$(rss_kib "$AUDGATE_PID" VmRSS) hwm_kib=$(rss_kib "$AUDGATE_PID" VmHWM)" >> "$RESULTS"
  echo "MEM label=allow_all-idle rss_kib=$(rss_kib "$FLOOR_PID" VmRSS) hwm_kib=$(rss_kib "$FLOOR_PID" VmHWM)" >> "$RESULTS"
  declare -A VPID VPORT
  if [ "$VARIANTS" = 1 ]; then
    for i in "${!VARIANT_NAMES[@]}"; do
      name=${VARIANT_NAMES[$i]}
      # shellcheck disable=SC2086
      taskset -c "$SERVER_CPU" "$REL/examples/serve_variant" --config "$OUT/$name.yaml" ${VARIANT_ARGS[$i]} 2>/dev/null &
      VPID[$name]=$!; PIDS+=("$!"); VPORT[$name]=$((27401 + 10 * i))
      wait_ready "http://127.0.0.1:$((27903 + i))/readyz"
    done
  fi
fi

loadgen() { # LABEL PORT TOKENS PID [extra args]
  local label=$1 port=$2 tokens=$3 pid=$4; shift 4
  taskset -c "$LOAD_CPU" "$REL/examples/loadgen" run --label "$label" --target "127.0.0.1:$port" \
    --tokens "$OUT/$tokens" --connections "$CONNS" --duration "$DURATION" --warmup "$WARMUP" \
    --server-pid "$pid" "$@" | sed "s/^RESULT /RESULT round=${ROUND:-0} /" | tee -a "$RESULTS" >&2
}

# ----------------------------------------------------------------------------------------- gRPC
if [ "$GRPC" = 1 ]; then
  echo "== decision-core cost in process (CPU $SERVER_CPU), per algorithm" >&2
  for alg in rs256 es256 eddsa; do
    echo "COST alg=$alg $(taskset -c "$SERVER_CPU" "$REL/examples/loadgen" cost --config "$OUT/audgate.yaml" \
      --tokens "$OUT/tokens-$alg-1.txt" --seconds 2 | sed 's/^COST //')" | tee -a "$RESULTS" >&2
  done
  for ROUND in $(seq 1 "$ROUNDS"); do
    round=$ROUND
    echo "== gRPC round $round/$ROUNDS ($CONNS connections, ${DURATION}s each)" >&2
    loadgen floor 27291 tokens-rs256-1.txt "$FLOOR_PID"
    loadgen cached 27191 tokens-rs256-1.txt "$AUDGATE_PID"
    loadgen cached-logall 27481 tokens-rs256-1.txt "$LOGALL_PID"
    # latency below saturation: the same fixed schedule for both (open loop)
    loadgen floor-open 27291 tokens-rs256-1.txt "$FLOOR_PID" --rate "$OPEN_RATE"
    loadgen cached-open 27191 tokens-rs256-1.txt "$AUDGATE_PID" --rate "$OPEN_RATE"
    loadgen cached-1k 27191 tokens-rs256-1000.txt "$AUDGATE_PID"
    loadgen uncached-RS256 27391 tokens-rs256-1.txt "$NOCACHE_PID"
    loadgen uncached-ES256 27391 tokens-es256-1.txt "$NOCACHE_PID"
    loadgen uncached-EdDSA 27391 tokens-eddsa-1.txt "$NOCACHE_PID"
    if [ "$VARIANTS" = 1 ]; then
      for name in "${VARIANT_NAMES[@]}"; do
        loadgen "$name" "${VPORT[$name]}" tokens-rs256-1.txt "${VPID[$name]}"
      done
    fi
  done
fi

# ---------------------------------------------------------------------------------------- Envoy
if [ "$ENVOY" = 1 ]; then
  echo "== Envoy $("$ENVOY_BIN" --version | grep -o '/1\.[0-9.]*/' | tr -d /) (1 worker) on CPU $SERVER_CPU, wrk on CPU $LOAD_CPU" >&2
  # the module listener loads $REL/libaudgate_envoy.so
  [ -f "$REL/libaudgate_envoy.so" ] || { echo "bench.sh: no $REL/libaudgate_envoy.so (cargo build --release -p audgate-envoy)" >&2; exit 1; }
  start envoy env ENVOY_DYNAMIC_MODULES_SEARCH_PATH="$(cd "$REL" && pwd)" \
    "$ENVOY_BIN" -c "$OUT/envoy.yaml" --concurrency 1 --base-id 4646 -l warn; ENVOY_PID=$STARTED
  wait_ready http://127.0.0.1:27909/ready
  TOKEN=$(head -1 "$OUT/tokens-rs256-1.txt")
  HEADERS=(-H "Host: shop.bench.test" -H "authorization: Bearer $TOKEN")
  while IFS= read -r h; do HEADERS+=(-H "$h"); done < "$OUT/wrk-headers.txt"
  WRK_ARGS=(-t1 -c"$CONNS" --latency "${HEADERS[@]}")
  URL_PATH="/api/orders/7?expand=items"
  declare -A LISTENER=([noauth]=27100 [jwt_authn]=27101 [jwt_authn-cache]=27102 [ext_authz-floor]=27103 [ext_authz-audgate]=27104
    [ext_authz-floor-rich]=27112 [http-floor]=27110 [http-audgate]=27111 [module]=27105)
  declare -A AUTHZ_PID=([ext_authz-floor]=$FLOOR_PID [ext_authz-audgate]=$AUDGATE_PID [ext_authz-floor-rich]=$RICH_PID
    [http-floor]=$FLOOR_PID [http-audgate]=$AUDGATE_PID)
  IFS=, read -r -a ENVOY_LABELS <<< "$LISTENERS"
  for label in "${ENVOY_LABELS[@]}"; do
    [ -n "${LISTENER[$label]:-}" ] || { echo "bench.sh: unknown listener $label" >&2; exit 2; }
  done
  # every listener must allow the bench's request before it is measured (the module's keys
  # load on its own thread at start)
  for label in "${ENVOY_LABELS[@]}"; do
    url="http://127.0.0.1:${LISTENER[$label]}$URL_PATH"
    for _ in $(seq 1 100); do
      code=$(curl -s -o /dev/null -w '%{http_code}' "${HEADERS[@]}" "$url" || true)
      [ "$code" = 200 ] && break
      sleep 0.1
    done
    [ "$code" = 200 ] || { echo "bench.sh: $label answers $code to the bench request" >&2; exit 1; }
  done
  LATENCY_LABELS=()
  for label in noauth jwt_authn-cache ext_authz-audgate module; do
    [[ ",$LISTENERS," == *",$label,"* ]] && LATENCY_LABELS+=("$label")
  done
  for round in $(seq 1 "$ROUNDS"); do
    echo "== Envoy round $round/$ROUNDS" >&2
    for label in "${ENVOY_LABELS[@]}"; do
      url="http://127.0.0.1:${LISTENER[$label]}$URL_PATH"
      taskset -c "$LOAD_CPU" wrk "${WRK_ARGS[@]}" -d"$WARMUP"s "$url" >/dev/null
      auth=${AUTHZ_PID[$label]:-}
      e0=$(cpu_ticks "$ENVOY_PID"); a0=0; [ -n "$auth" ] && a0=$(cpu_ticks "$auth")
      file="$OUT/wrk-$label-$round.txt"
      taskset -c "$LOAD_CPU" wrk "${WRK_ARGS[@]}" -d"$DURATION"s "$url" > "$file"
      e1=$(cpu_ticks "$ENVOY_PID"); a1=0; [ -n "$auth" ] && a1=$(cpu_ticks "$auth")
      line="WRK label=$label round=$round file=$file envoy_cpu_s=$(awk "BEGIN { print ($e1 - $e0) / $TCK }") authz_cpu_s=$(awk "BEGIN { print ($a1 - $a0) / $TCK }")"
      echo "$line" >> "$RESULTS"
      echo "$label: $(grep -E 'Requests/sec|Non-2xx' "$file" | xargs)" >&2
    done
    # latency at 1 connection: what a check adds to one request, with nothing queued
    for label in "${LATENCY_LABELS[@]}"; do
      url="http://127.0.0.1:${LISTENER[$label]}$URL_PATH"
      file="$OUT/wrk1-$label-$round.txt"
      taskset -c "$LOAD_CPU" wrk -t1 -c1 --latency "${HEADERS[@]}" -d"$DURATION"s "$url" > "$file"
      echo "WRK1 label=$label round=$round file=$file" >> "$RESULTS"
      echo "$label -c1: $(grep -E '^ +50%|Non-2xx' "$file" | xargs)" >&2
    done
  done
  echo "MEM label=envoy rss_kib=$(rss_kib "$ENVOY_PID" VmRSS) hwm_kib=$(rss_kib "$ENVOY_PID" VmHWM)" >> "$RESULTS"
fi

# --------------------------------------------------------------------------------------- memory
if [ "$MEMORY" = 1 ]; then
  ROUND=0
  echo "== memory: $MEMORY_TOKENS distinct EdDSA tokens for ${MEM_DURATION}s against audgate (default cache cap)" >&2
  echo "MEM label=audgate-before-memory-load rss_kib=$(rss_kib "$AUDGATE_PID" VmRSS) hwm_kib=$(rss_kib "$AUDGATE_PID" VmHWM)" >> "$RESULTS"
  DURATION=$MEM_DURATION loadgen memory-100k 27191 "tokens-eddsa-$MEMORY_TOKENS.txt" "$AUDGATE_PID"
  echo "MEM label=audgate-under-load rss_kib=$(rss_kib "$AUDGATE_PID" VmRSS) hwm_kib=$(rss_kib "$AUDGATE_PID" VmHWM)" >> "$RESULTS"
  metrics=$(curl -sf http://127.0.0.1:27901/metrics)
  hits=$(echo "$metrics" | awk '/^audgate_token_cache_hits_total/ { print $2 }')
  misses=$(echo "$metrics" | awk '/^audgate_token_cache_misses_total/ { print $2 }')
  echo "CACHE hits=$hits misses=$misses" >> "$RESULTS"
  # the same load on the instance without a cache: what the cache itself adds
  echo "MEM label=nocache-before-memory-load rss_kib=$(rss_kib "$NOCACHE_PID" VmRSS) hwm_kib=$(rss_kib "$NOCACHE_PID" VmHWM)" >> "$RESULTS"
  DURATION=$MEM_DURATION loadgen memory-100k-nocache 27391 "tokens-eddsa-$MEMORY_TOKENS.txt" "$NOCACHE_PID"
  echo "MEM label=nocache-under-load rss_kib=$(rss_kib "$NOCACHE_PID" VmRSS) hwm_kib=$(rss_kib "$NOCACHE_PID" VmHWM)" >> "$RESULTS"
  taskset -c "$SERVER_CPU" "$REL/audgate" serve --config "$OUT/audgate-12mib.yaml" 2>/dev/null &
  CAP12_PID=$!; PIDS+=("$CAP12_PID")
  wait_ready http://127.0.0.1:27915/readyz
  DURATION=$MEM_DURATION loadgen memory-100k-12mib 27591 "tokens-eddsa-$MEMORY_TOKENS.txt" "$CAP12_PID"
  echo "MEM label=audgate-12mib-under-load rss_kib=$(rss_kib "$CAP12_PID" VmRSS) hwm_kib=$(rss_kib "$CAP12_PID" VmHWM)" >> "$RESULTS"
  # heap per cache entry, measured with a counting allocator, against what the weigher charges
  taskset -c "$SERVER_CPU" "$REL/examples/cache_memory" --config "$OUT/audgate.yaml" \
    --tokens "$OUT/tokens-eddsa-$MEMORY_TOKENS.txt" | tee -a "$RESULTS" >&2
fi

echo "MACHINE loadavg_end=$(cut -d' ' -f1 /proc/loadavg)" >> "$RESULTS"
cleanup
table "$RESULTS" | tee "$OUT/summary.txt"
if [ "$INSTRUCTIONS" = 1 ]; then
  echo "== instructions per check (callgrind)" >&2
  echo | tee -a "$OUT/summary.txt"
  INSTR_ARGS=(--no-build)
  [ "$GRPC" = 1 ] || INSTR_ARGS+=(--skip-grpc)
  [ "$ENVOY" = 1 ] && INSTR_ARGS+=(--envoy "$ENVOY_BIN")
  scripts/bench-instructions.sh "${INSTR_ARGS[@]}" | tee -a "$OUT/summary.txt"
fi
