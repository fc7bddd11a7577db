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
BIN="$PWD/.tools/bin"

if [ -x "$BIN/helm" ] && [ "$("$BIN/helm" version --template '{{.Version}}' 2>/dev/null)" = "$HELM_VERSION" ]; then
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
# The version string helm prints comes from an ldflag, as Helm's own Makefile sets it.
GOBIN="$BIN" GOFLAGS=-buildvcs=false "$GO" install \
  -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" \
  "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
"$BIN/helm" version --template '{{.Version}}' | grep -qx "$HELM_VERSION"
