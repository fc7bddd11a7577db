#!/usr/bin/env bash
# tests/oidc_provider.rs runs audgate against a real OpenID provider, npm's oidc-provider (pinned
# in tests/oidc-provider/package-lock.json), under the machine's node (20 or later). This installs
# it with `npm ci` from the npm registry, only when node_modules is missing or was installed from
# another lock file (a hash of package-lock.json is kept next to it). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/../tests/oidc-provider"

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  echo "install-oidc-provider: node and npm are needed (Node.js 20 or later)" >&2
  exit 1
fi
STAMP=node_modules/.audgate-lock.sha256
want=$(sha256sum package-lock.json | cut -d' ' -f1)
if [ ! -f node_modules/oidc-provider/package.json ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
  echo "installing tests/oidc-provider (npm ci: oidc-provider from package-lock.json)" >&2
  npm ci --no-audit --no-fund --loglevel=error
  echo "$want" > "$STAMP"
fi
