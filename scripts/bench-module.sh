#!/usr/bin/env bash
# audgate inside Envoy (issue 13), the short way: scripts/bench.sh's Envoy part only, on the four
# listeners the issue's targets compare, all in one Envoy 1.40 (--concurrency 1) from
# benches/envoy/bench.yaml:
#   noauth             no auth filter
#   jwt_authn-cache    Envoy's jwt_authn with jwt_cache_config, the same token and audience rule
#   ext_authz-audgate  ext_authz (gRPC) -> audgate serve, the same config file
#   module             audgate in process (libaudgate_envoy.so, release build), the same config
# Throughput with wrk -c32, then p50 latency with wrk -c1, --rounds rounds; prints the medians,
# the ratios of this run and the issue's 4 targets. Envoy and audgate on CPU $BENCH_SERVER_CPU
# (0), wrk on CPU $BENCH_LOAD_CPU (1). With --instructions, also Envoy's instructions per request
# under callgrind for noauth, jwt_authn-cache and module (the count other load cannot move).
# Results in target/bench/ (summary.txt, results.txt).
#
# usage: scripts/bench-module.sh [--rounds N] [--duration S] [--no-build] [other bench.sh flags]
set -euo pipefail
cd "$(dirname "$0")/.."
exec scripts/bench.sh --skip-micro --skip-grpc --skip-memory \
  --listeners noauth,jwt_authn-cache,ext_authz-audgate,module "$@"
