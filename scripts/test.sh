#!/usr/bin/env bash
# Every test: unit, conformance vectors, and end-to-end through real Envoy (installed on demand).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/envoy-env.sh
exec cargo test "$@"
