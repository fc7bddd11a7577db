#!/usr/bin/env bash
# audgate soak (issue 7), one command: builds audgate and the soak driver (release by default),
# makes sure Envoy is installed (scripts/envoy-env.sh), then runs examples/soak.rs: mixed
# traffic (valid, expired, forged, random kid, no token, wrong audience) through a real Envoy
# into `audgate serve` for --duration seconds after a warm-up, every answer checked, audgate's
# RSS and open fds sampled every 30 s. Prints the report; exits 1 when the soak failed.
# Everything listens on free 127.0.0.1 ports. docs/reliability.md has a 10-minute run.
#
# --mode module soaks audgate inside Envoy instead (the dynamic module, no audgate process):
# tests/e2e_module.rs's module_soak for --duration seconds (mixed traffic, every answer
# checked, JWKS fetches bounded, Envoy's RSS flat), with the module built in the same profile.
#
# usage: scripts/soak.sh [--mode ext_authz|module] [--debug] [--no-build] [--duration 600]
#          [other examples/soak.rs flags]
#   (--warmup S, --connections N, --rate REQ_PER_S, --sample-interval S, --tokens N,
#    --hot-tokens N, --cache-entries N, --rss-tolerance-mib MIB, --fd-tolerance N, --log RUST_LOG)
set -euo pipefail
cd "$(dirname "$0")/.."

PROFILE=release BUILD=1 DURATION=600 MODE=ext_authz
ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --debug) PROFILE=debug ;;
    --no-build) BUILD=0 ;;
    --duration) DURATION=$2; shift ;;
    --mode) MODE=$2; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) ARGS+=("$1") ;;
  esac
  shift
done

TARGET=${CARGO_TARGET_DIR:-target}
if [ "$MODE" = module ]; then
  PROFILE_FLAG=()
  [ "$PROFILE" = release ] && PROFILE_FLAG=(--release)
  [ "$BUILD" = 1 ] && cargo build "${PROFILE_FLAG[@]}" -p audgate-envoy
  . scripts/envoy-env.sh
  echo "soak (module): $PROFILE build, ${DURATION}s, $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg)" >&2
  AUDGATE_TEST_MODULE_DIR="$TARGET/$PROFILE" AUDGATE_MODULE_SOAK_SECS="$DURATION" \
    exec cargo test "${PROFILE_FLAG[@]}" --test e2e_module module_soak -- --nocapture
elif [ "$MODE" != ext_authz ]; then
  echo "--mode must be ext_authz or module" >&2
  exit 2
fi
if [ "$BUILD" = 1 ]; then
  if [ "$PROFILE" = release ]; then
    cargo build --release --bin audgate --example soak
  else
    cargo build --bin audgate --example soak
  fi
fi
. scripts/envoy-env.sh
echo "soak: $PROFILE build, ${DURATION}s, $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg)" >&2
exec "$TARGET/$PROFILE/examples/soak" --audgate "$TARGET/$PROFILE/audgate" --duration "$DURATION" "${ARGS[@]}"
