#!/usr/bin/env bash
# Installs the cargo subcommands CI uses, at pinned versions, from crates.io source
# (`cargo install --locked`), when one is missing or of another version:
#   cargo-deny  scripts/supply-chain.sh (licenses, bans, sources)
#   cargo-fuzz  scripts/fuzz.sh (libFuzzer targets under fuzz/)
#
#   scripts/install-cargo-tools.sh            both
#   scripts/install-cargo-tools.sh deny|fuzz  one
#
# Build times measured on this project's 2-core machine while others were compiling there
# (idle, expect less): cargo-deny 0.20.2 about 5 min (3 min of CPU), cargo-fuzz about 1.5 min.
# cargo-deny's own release profile asks for fat LTO with one codegen unit, a long serial link;
# it is overridden here (plain release: thin local LTO, 16 units), as the checks take a second
# either way. Builds run with `nice`: the machine is shared.
set -euo pipefail

CARGO_DENY_VERSION=0.20.2
CARGO_FUZZ_VERSION=0.13.2

# install CRATE VERSION SUBCOMMAND: `cargo SUBCOMMAND --version` prints "cargo-SUBCOMMAND X.Y.Z"
install() {
  local crate=$1 version=$2 sub=$3 have
  have=$(cargo "$sub" --version 2>/dev/null | awk '{print $2}' || true)
  if [ "$have" = "$version" ]; then
    echo "$crate $version: present" >&2
    return
  fi
  echo "$crate: installing $version (found: ${have:-none})" >&2
  local start=$SECONDS
  CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 \
    nice -n 10 cargo install --locked --quiet --force "$crate" --version "=$version"
  echo "$crate $version: installed in $((SECONDS - start)) s" >&2
}

case "${1:-all}" in
  deny) install cargo-deny "$CARGO_DENY_VERSION" deny ;;
  fuzz) install cargo-fuzz "$CARGO_FUZZ_VERSION" fuzz ;;
  all)
    install cargo-deny "$CARGO_DENY_VERSION" deny
    install cargo-fuzz "$CARGO_FUZZ_VERSION" fuzz
    ;;
  *)
    echo "usage: $0 [deny|fuzz|all]" >&2
    exit 2
    ;;
esac
