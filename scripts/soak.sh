#!/usr/bin/env bash
# audgate soak (issue 7), one command: builds audgate and the soak driver (release by default),
# makes sure Envoy is installed (scripts/envoy-env.sh), then runs examples/soak.rs: mixed
# traffic (valid, expired, forged, random kid, no token, wrong audience) through a real Envoy
# into `audgate serve` for --duration seconds after a warm-up, every answer checked, audgate's
# RSS and open fds sampled every 30 s. Prints the report; exits 1 when the soak failed.
# Everything listens on free 127.0.0.1 ports. docs/reliability.md has a 10-minute run.
#
# usage: scripts/soak.sh [--debug] [--no-build] [--duration 600] [other examples/soak.rs flags]
#   (--warmup S, --connections N, --rate REQ_PER_S, --sample-interval S, --tokens N,
#    --hot-tokens N, --cache-entries N, --rss-tolerance-mib MIB, --fd-tolerance N, --log RUST_LOG)
set -euo pipefail
cd "$(dirname "$0")/.."

PROFILE=release BUILD=1 DURATION=600
ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --debug) PROFILE=debug ;;
    --no-build) BUILD=0 ;;
    --duration) DURATION=$2; shift ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) ARGS+=("$1") ;;
  esac
  shift
done

TARGET=${CARGO_TARGET_DIR:-target}
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
