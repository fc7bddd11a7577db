#!/usr/bin/env bash
set -euo pipefail
# The metrics test (tests/e2e_ops.rs) scrapes audgate with a real Prometheus and lints the
# exposition with promtool: Debian's `prometheus` package ships both. Installed only when
# missing. The tests run the binaries themselves on free loopback ports, so the package's own
# service is kept from starting (scripts/apt-install.sh).
if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
  echo "installing prometheus and promtool (Debian package prometheus)" >&2
  "$(dirname "$0")/apt-install.sh" prometheus
fi
