#!/usr/bin/env bash
set -euo pipefail
# tests/e2e_confusion.rs runs a real nginx in front of audgate's HTTP endpoint (auth_request, in
# nginx.org's and ingress-nginx's wirings): Debian's `nginx-light` package. Installed only when
# missing. The tests run nginx themselves on free loopback ports with their own config, so the
# package's service is kept from starting (scripts/apt-install.sh).
if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
  echo "installing nginx (Debian package nginx-light)" >&2
  "$(dirname "$0")/apt-install.sh" nginx-light
fi
