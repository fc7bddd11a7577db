#!/usr/bin/env bash
set -euo pipefail
# tests/e2e_confusion.rs runs a real nginx in front of audgate's HTTP endpoint (auth_request, in
# nginx.org's and ingress-nginx's wirings): Debian's `nginx-light` package. Installed only when
# missing. The tests run nginx themselves on free loopback ports with their own config, so the
# package's service is kept from starting (policy-rc.d, only while installing and only if none
# exists).
if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
  echo "installing nginx (Debian package nginx-light)" >&2
  SUDO=
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; fi
  POLICY=/usr/sbin/policy-rc.d
  if [ ! -e "$POLICY" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null
    $SUDO chmod 755 "$POLICY"
    trap '$SUDO rm -f "$POLICY"' EXIT
  fi
  $SUDO apt-get update -q
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends nginx-light
  if [ -n "$(trap -p EXIT)" ]; then $SUDO rm -f "$POLICY"; trap - EXIT; fi
fi
