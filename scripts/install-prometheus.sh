#!/usr/bin/env bash
set -euo pipefail
# The metrics test (tests/e2e_ops.rs) scrapes audgate with a real Prometheus and lints the
# exposition with promtool: Debian's `prometheus` package ships both. Installed only when
# missing. The tests run the binaries themselves on free loopback ports, so the package's own
# service is kept from starting (policy-rc.d, only while installing and only if none exists).
if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
  echo "installing prometheus and promtool (Debian package prometheus)" >&2
  SUDO=
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; fi
  POLICY=/usr/sbin/policy-rc.d
  if [ ! -e "$POLICY" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null
    $SUDO chmod 755 "$POLICY"
    trap '$SUDO rm -f "$POLICY"' EXIT
  fi
  $SUDO apt-get update -q
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus
  if [ -n "$(trap -p EXIT)" ]; then $SUDO rm -f "$POLICY"; trap - EXIT; fi
fi
