#!/usr/bin/env bash
# scripts/apt-install.sh PACKAGE...: installs Debian packages for the test scripts
# (install-nginx.sh, install-prometheus.sh, install-keycloak.sh), as root or through sudo,
# without recommends and without questions. The callers check first whether their tool is
# missing; this always installs. A package's own service is kept from starting: the tests run
# the programs themselves on free loopback ports (policy-rc.d, only while installing and only
# if none exists).
set -euo pipefail
if [ "$#" -eq 0 ]; then
  echo "usage: scripts/apt-install.sh PACKAGE..." >&2
  exit 2
fi
SUDO=
if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; fi
POLICY=/usr/sbin/policy-rc.d
if [ ! -e "$POLICY" ]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null
  $SUDO chmod 755 "$POLICY"
  trap '$SUDO rm -f "$POLICY"' EXIT
fi
$SUDO apt-get update -q
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"
