#!/usr/bin/env bash
# Supply-chain checks with cargo-deny, policy in deny.toml, for both lock files: Cargo.lock
# (audgate, its build and dev dependencies, every target platform) and fuzz/Cargo.lock.
#   licenses  every crate's license expression is satisfied by the allow-list
#   bans      denied crates (OpenSSL bindings, known-unmaintained crates), wildcard versions;
#             duplicate versions are warnings
#   sources   crates.io only: no git dependency, no other registry
#   advisories (RustSec: vulnerabilities, unmaintained, unsound, yanked) only when a copy of
#             the advisory database is already on disk: it is a git repository on GitHub, which
#             this project's machines cannot reach (only package registries). It is then read
#             offline, never fetched.
# Installs cargo-deny (pinned) when missing. Inclusion graphs are hidden to keep the log short;
# `cargo deny check bans` without the flag shows who pulls a crate in (or `cargo tree -i NAME`).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-cargo-tools.sh deny

db_dir=${CARGO_HOME:-$HOME/.cargo}/advisory-dbs
advisories=()
if compgen -G "$db_dir/*/crates" >/dev/null; then
  advisories=(advisories)
else
  echo "supply-chain: no RustSec advisory database in $db_dir: advisories not checked" >&2
fi

# deny MANIFEST [ARGS...]: licenses, bans and sources (cargo metadata may download crates),
# then advisories from the local database only (--offline: never fetched)
deny() {
  local manifest=$1
  shift
  echo "== cargo deny check licenses bans sources${advisories:+ advisories} ($manifest)" >&2
  cargo deny --manifest-path "$manifest" check --hide-inclusion-graph "$@" licenses bans sources
  if [ ${#advisories[@]} -gt 0 ]; then
    cargo deny --offline --manifest-path "$manifest" check --hide-inclusion-graph advisories
  fi
}

start=$SECONDS
# -A: the libfuzzer-sys license exception is used by fuzz/Cargo.lock only
deny Cargo.toml -A license-exception-not-encountered
deny fuzz/Cargo.toml
echo "supply-chain: ok in $((SECONDS - start)) s" >&2
