#!/usr/bin/env bash
# A local demo: audgate + real Envoy + an echo upstream + a development issuer whose key is
# generated at start (never written to disk). Prints curl commands; Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/envoy-env.sh
cargo build --quiet --bin audgate --example demo
exec target/debug/examples/demo
