#!/usr/bin/env bash
# tests/keycloak.rs runs audgate against a real Keycloak server. This installs Keycloak's server
# distribution (org.keycloak:keycloak-quarkus-dist, pinned below) from Maven Central with Maven,
# unpacked under .keycloak/keycloak-$KEYCLOAK_VERSION, only when that directory is missing or
# incomplete. Idempotent. Keycloak 26 runs on Java 21 or 17 (not on newer ones, such as a
# Temurin 25 also found on some machines): the JDK it should use is written to .keycloak/java-home.
# The tests find it as .keycloak/keycloak-$KEYCLOAK_VERSION (or $AUDGATE_TEST_KEYCLOAK).
set -euo pipefail
cd "$(dirname "$0")/.."

KEYCLOAK_VERSION=26.5.6
DIR=.keycloak
HOME_DIR=$DIR/keycloak-$KEYCLOAK_VERSION
STAMP=$HOME_DIR/.audgate-installed

# A Java 21 or 17 home: $JAVA_HOME, the `java` on PATH, or one under /usr/lib/jvm.
java_major() { "$1/bin/java" -version 2>&1 | sed -n 's/.* version "\([0-9]*\).*/\1/p' | head -1; }
find_java_home() {
  local candidates=()
  [ -n "${JAVA_HOME:-}" ] && candidates+=("$JAVA_HOME")
  if command -v java >/dev/null 2>&1; then
    candidates+=("$(dirname "$(dirname "$(readlink -f "$(command -v java)")")")")
  fi
  for d in /usr/lib/jvm/*21* /usr/lib/jvm/*17*; do [ -d "$d" ] && candidates+=("$d"); done
  for d in "${candidates[@]}"; do
    case "$(java_major "$d" 2>/dev/null)" in 21|17) echo "$d"; return 0 ;; esac
  done
  return 1
}

if ! command -v mvn >/dev/null 2>&1 || ! find_java_home >/dev/null; then
  echo "installing Maven and OpenJDK 17 (Debian packages maven, openjdk-17-jdk-headless)" >&2
  scripts/apt-install.sh maven openjdk-17-jdk-headless
fi
JAVA_FOR_KEYCLOAK=$(find_java_home) || { echo "install-keycloak: no Java 21 or 17 found" >&2; exit 1; }
mkdir -p "$DIR"
echo "$JAVA_FOR_KEYCLOAK" > "$DIR/java-home"
if [ -f "$STAMP" ] && [ -x "$HOME_DIR/bin/kc.sh" ] && [ -x "$HOME_DIR/bin/kcadm.sh" ]; then
  exit 0
fi
echo "installing Keycloak $KEYCLOAK_VERSION into $HOME_DIR (Maven Central: org.keycloak:keycloak-quarkus-dist)" >&2
DL=$(mktemp -d "$DIR/download.XXXXXX")
trap 'rm -rf "$DL"' EXIT
JAVA_HOME=$JAVA_FOR_KEYCLOAK mvn -q -B org.apache.maven.plugins:maven-dependency-plugin:3.8.1:copy \
  -Dartifact="org.keycloak:keycloak-quarkus-dist:$KEYCLOAK_VERSION:tar.gz" \
  -DoutputDirectory="$DL" -Dmdep.useBaseVersion=true
ARCHIVE=$DL/keycloak-quarkus-dist-$KEYCLOAK_VERSION.tar.gz
rm -rf "$HOME_DIR" "$DL/keycloak-$KEYCLOAK_VERSION"
tar -xzf "$ARCHIVE" -C "$DL"
mv "$DL/keycloak-$KEYCLOAK_VERSION" "$HOME_DIR"
# The Maven copy in ~/.m2 is not needed again: the unpacked directory is the cache.
date -u +%FT%TZ > "$STAMP"
echo "Keycloak $KEYCLOAK_VERSION installed in $HOME_DIR" >&2
