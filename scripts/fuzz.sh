#!/usr/bin/env bash
# Coverage-guided fuzzing of audgate's parsers and decision core with cargo-fuzz (libFuzzer).
#
#   scripts/fuzz.sh TARGET [SECONDS]    run one target (default 300 s): jwt, evaluate, config, jwks, path
#   scripts/fuzz.sh all [SECONDS]       every target in turn, SECONDS each
#   scripts/fuzz.sh --smoke             every target for 30 s (a quick check after a change)
#   scripts/fuzz.sh --merge TARGET      fold what a run found (fuzz/work/TARGET) into the
#                                       committed corpus: the fewest inputs that cover every
#                                       edge the seeds do not (set cover, hit counts ignored)
#   scripts/fuzz.sh --list              the targets
#
# Properties and input formats: fuzz/src/props.rs. Seeds: fuzz/corpus/TARGET/seed-* (rebuild
# with `cargo run --manifest-path fuzz/Cargo.toml --example make_seeds`). `cargo test --test
# adversarial` replays every corpus file through the same properties without libFuzzer.
#
# Needs cargo-fuzz (`cargo install cargo-fuzz`, ~2 min). It asks for nightly-only rustc flags;
# on a stable toolchain RUSTC_BOOTSTRAP=1 makes rustc accept them. The code is
# #![forbid(unsafe_code)], so no sanitizer is used (-s none): that keeps builds and runs fast,
# while debug assertions and overflow checks stay on. One job, niced: the machine is shared.
# A crash lands in fuzz/artifacts/TARGET/ and the script exits non-zero; reproduce it with
#   RUSTC_BOOTSTRAP=1 cargo fuzz run -s none -a --fuzz-dir fuzz TARGET fuzz/artifacts/TARGET/crash-...
# FUZZ_DEV=1 builds without optimizations (cargo fuzz --dev): ~40% less build time, slower
# runs; what CI's short smoke run uses.
# FUZZ_KEEP_GOING=1 keeps fuzzing past crashes (libFuzzer -fork=1 -ignore_crashes=1), e.g. while
# a known bug is open; every crash is still saved in fuzz/artifacts/TARGET/.
set -euo pipefail
cd "$(dirname "$0")/.."

TARGETS=(jwt evaluate config jwks path)
export RUSTC_BOOTSTRAP=1
# libFuzzer: -timeout (s) turns a slow input into a finding ("no hang"); bounded memory.
LIBFUZZER_FLAGS=(-timeout=10 -rss_limit_mb=2048 -max_len=20000 -print_final_stats=1)
BUILD_FLAGS=(-s none -a)
if [ -n "${FUZZ_DEV:-}" ]; then
  BUILD_FLAGS+=(--dev)
fi
if [ -n "${FUZZ_KEEP_GOING:-}" ]; then
  LIBFUZZER_FLAGS+=(-fork=1 -ignore_crashes=1 -ignore_timeouts=1)
fi

need_cargo_fuzz() {
  if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "cargo-fuzz is not installed: cargo install cargo-fuzz" >&2
    exit 2
  fi
}

run() {
  local target=$1 seconds=$2
  mkdir -p "fuzz/work/$target"
  echo "== fuzz $target for ${seconds}s" >&2
  mkdir -p "fuzz/artifacts/$target"
  local dict=fuzz/json.dict
  [ "$target" = config ] && dict=fuzz/config.dict
  nice -n 10 cargo fuzz run "${BUILD_FLAGS[@]}" --fuzz-dir fuzz "$target" "fuzz/work/$target" "fuzz/corpus/$target" -- \
    -artifact_prefix="fuzz/artifacts/$target/" -dict="$dict" \
    "${LIBFUZZER_FLAGS[@]}" -max_total_time="$seconds"
}

case "${1:-}" in
  --list)
    printf '%s\n' "${TARGETS[@]}"
    ;;
  --smoke)
    need_cargo_fuzz
    nice -n 10 cargo fuzz build "${BUILD_FLAGS[@]}" --fuzz-dir fuzz
    for t in "${TARGETS[@]}"; do run "$t" 30; done
    ;;
  --merge)
    need_cargo_fuzz
    t=${2:?usage: scripts/fuzz.sh --merge TARGET}
    nice -n 10 cargo fuzz run "${BUILD_FLAGS[@]}" --fuzz-dir fuzz "$t" "fuzz/corpus/$t" "fuzz/work/$t" -- \
      -set_cover_merge=1 -use_counters=0 -artifact_prefix="fuzz/artifacts/$t/" \
      "${LIBFUZZER_FLAGS[@]}"
    ;;
  all)
    need_cargo_fuzz
    for t in "${TARGETS[@]}"; do run "$t" "${2:-300}"; done
    ;;
  jwt | evaluate | config | jwks | path)
    need_cargo_fuzz
    run "$1" "${2:-300}"
    ;;
  *)
    sed -n '2,/^set -euo/p' "$0" | sed '$d' >&2
    exit 2
    ;;
esac
