#!/usr/bin/env bash
# The Helm chart checks (tests/helm.rs) run the real `helm lint` and `helm template`. Helm is a
# Go program: this builds the pinned release from the Go module proxy into .tools/bin (kept out
# of git), only when that exact version is not there yet. Needs Go (`go` on PATH or in
# /usr/local/go/bin); the first build takes a few minutes, later runs are a version check.
# The tests look for $AUDGATE_TEST_HELM, then .tools/bin/helm, and fail with this script's
# name when neither exists.
set -euo pipefail
cd "$(dirname "$0")/.."

HELM_VERSION=v3.21.4
# What Helm's own Makefile stamps in: the version it prints, and the Kubernetes version that
# `helm template` and `helm lint` assume (1.N for the k8s.io/client-go v0.N that release builds
# with: v0.36 for v3.21.4). Without these Helm assumes Kubernetes 1.20.
K8S_MINOR=36
LDFLAGS="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
for pkg in pkg/lint/rules pkg/chartutil; do
  LDFLAGS="$LDFLAGS -X helm.sh/helm/v3/$pkg.k8sVersionMajor=1 -X helm.sh/helm/v3/$pkg.k8sVersionMinor=$K8S_MINOR"
done
BIN="$PWD/.tools/bin"
STAMP="$BIN/.helm-build"

if [ -x "$BIN/helm" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$LDFLAGS" ] \
  && [ "$("$BIN/helm" version --template '{{.Version}}' 2>/dev/null)" = "$HELM_VERSION" ]; then
  exit 0
fi

GO=$(command -v go || true)
if [ -z "$GO" ] && [ -x /usr/local/go/bin/go ]; then GO=/usr/local/go/bin/go; fi
if [ -z "$GO" ]; then
  echo "install-helm.sh: Helm $HELM_VERSION is built from the Go module proxy and needs Go, which is not installed" >&2
  exit 1
fi

echo "building helm $HELM_VERSION from the Go module proxy into .tools/bin ($GO)" >&2
mkdir -p "$BIN"
rm -f "$STAMP"
GOBIN="$BIN" GOFLAGS=-buildvcs=false "$GO" install -ldflags "$LDFLAGS" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
"$BIN/helm" version --template '{{.Version}}' | grep -qx "$HELM_VERSION"
printf '%s' "$LDFLAGS" > "$STAMP"
