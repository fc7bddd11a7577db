#!/usr/bin/env bash
# audgate inside Envoy (issue 13): one Envoy 1.40 (--concurrency 1) with three listeners that
# differ only in their auth filter, all answering with a direct_response:
#   noauth           no auth filter
#   jwt_authn-cache  Envoy's jwt_authn with jwt_cache_config, the same token and audience rule
#   module           audgate in process (libaudgate_envoy.so, release build), verified-token cache on
# wrk -t1 against each in turn for --rounds rounds (throughput with -c10, then p50 latency with
# -c1), Envoy on CPU $BENCH_SERVER_CPU (0), wrk on CPU $BENCH_LOAD_CPU (1). Prints the medians
# and the ratios of this run. Needs python3 with `cryptography` (the test key and token) and wrk.
# Loopback ports 27600-27602 and 27609. Results in target/bench-module/.
#
# usage: scripts/bench-module.sh [--rounds N] [--duration S] [--no-build]
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=3 DURATION=8 BUILD=1
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) ROUNDS=$2; shift ;;
    --duration) DURATION=$2; shift ;;
    --no-build) BUILD=0 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "unknown flag $1" >&2; exit 2 ;;
  esac
  shift
done
SERVER_CPU=${BENCH_SERVER_CPU:-0} LOAD_CPU=${BENCH_LOAD_CPU:-1}
TARGET=${CARGO_TARGET_DIR:-target}
[ "$BUILD" = 1 ] && cargo build --release -p audgate-envoy
command -v wrk >/dev/null || { echo "bench-module.sh: wrk is needed (apt-get install wrk)" >&2; exit 1; }
. scripts/envoy-env.sh
OUT=$TARGET/bench-module
rm -rf "$OUT" && mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

# An RS256 key, its JWKS and a Keycloak-shaped token for client `bench-client`, valid for a day.
python3 - "$OUT" <<'PY'
import base64, json, sys, time
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
out = sys.argv[1]
b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
n = key.public_key().public_numbers()
as_bytes = lambda i: i.to_bytes((i.bit_length() + 7) // 8, "big")
jwk = {"kty": "RSA", "kid": "bench-1", "alg": "RS256", "use": "sig", "n": b64(as_bytes(n.n)), "e": b64(as_bytes(n.e))}
open(f"{out}/jwks.json", "w").write(json.dumps({"keys": [jwk]}))
now = int(time.time())
claims = {"iss": "https://sso.bench.test/realms/shop", "sub": "user-1", "aud": "bench-client", "azp": "bench-client",
          "iat": now, "exp": now + 86400, "scope": "openid profile", "typ": "Bearer"}
header = {"alg": "RS256", "typ": "JWT", "kid": "bench-1"}
signing = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
sig = key.sign(signing.encode(), padding.PKCS1v15(), hashes.SHA256())
open(f"{out}/token.txt", "w").write(f"{signing}.{b64(sig)}\n")
PY
TOKEN=$(cat "$OUT/token.txt")
JWKS=$(cat "$OUT/jwks.json")

cat > "$OUT/audgate.yaml" <<EOF
issuers:
  shop:
    issuer: https://sso.bench.test/realms/shop
    jwks_file: $OUT/jwks.json
routes:
  - name: orders
    match: { path_prefix: /api/orders }
    client_ids: [bench-client]
default: deny
EOF

listener() { # NAME PORT FILTERS_YAML
  cat <<EOF
  - name: $1
    address: { socket_address: { address: 127.0.0.1, port_value: $2 } }
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: $1
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes: [{ match: { prefix: "/" }, direct_response: { status: 200, body: { inline_string: "ok" } } }]
          http_filters:
$3
          - name: envoy.filters.http.router
            typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }
EOF
}
JWT_AUTHN=$(cat <<EOF
          - name: envoy.filters.http.jwt_authn
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication
              providers:
                shop:
                  issuer: https://sso.bench.test/realms/shop
                  audiences: [bench-client]
                  local_jwks: { inline_string: '$JWKS' }
                  forward: true
                  jwt_cache_config: { jwt_cache_size: 100 }
              rules: [{ match: { prefix: "/" }, requires: { provider_name: shop } }]
EOF
)
MODULE=$(cat <<EOF
          - name: envoy.filters.http.dynamic_modules
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter
              dynamic_module_config: { name: audgate_envoy }
              filter_name: audgate
              filter_config: { "@type": type.googleapis.com/google.protobuf.StringValue, value: "$OUT/audgate.yaml" }
EOF
)
{
  echo "admin: { address: { socket_address: { address: 127.0.0.1, port_value: 27609 } } }"
  echo "static_resources:"
  echo "  listeners:"
  listener noauth 27600 ""
  listener jwt_authn_cache 27601 "$JWT_AUTHN"
  listener module 27602 "$MODULE"
} > "$OUT/envoy.yaml"

ENVOY_DYNAMIC_MODULES_SEARCH_PATH=$(cd "$TARGET/release" && pwd) taskset -c "$SERVER_CPU" \
  "$AUDGATE_TEST_ENVOY" -c "$OUT/envoy.yaml" --concurrency 1 --disable-hot-restart -l warn \
  > "$OUT/envoy.log" 2>&1 &
ENVOY_PID=$!
trap 'kill "$ENVOY_PID" 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
  curl -sf http://127.0.0.1:27609/ready >/dev/null 2>&1 && break
  sleep 0.1
done
curl -sf http://127.0.0.1:27609/ready >/dev/null || { cat "$OUT/envoy.log" >&2; exit 1; }

URL_PATH="/api/orders/7?expand=items"
declare -A PORT=([noauth]=27600 [jwt_authn-cache]=27601 [module]=27602)
for label in jwt_authn-cache module; do # every variant must allow the token
  code=$(curl -s -o /dev/null -w '%{http_code}' -H "authorization: Bearer $TOKEN" "http://127.0.0.1:${PORT[$label]}$URL_PATH")
  [ "$code" = 200 ] || { echo "$label answered $code to the bench token" >&2; cat "$OUT/envoy.log" >&2; exit 1; }
done
code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:27602$URL_PATH")
[ "$code" = 401 ] || { echo "module answered $code without a token" >&2; exit 1; }

for round in $(seq 1 "$ROUNDS"); do
  for label in noauth jwt_authn-cache module; do
    url="http://127.0.0.1:${PORT[$label]}$URL_PATH"
    args=(-t1 --latency -H "authorization: Bearer $TOKEN")
    taskset -c "$LOAD_CPU" wrk "${args[@]}" -c10 -d2s "$url" >/dev/null
    taskset -c "$LOAD_CPU" wrk "${args[@]}" -c10 -d"$DURATION"s "$url" > "$OUT/wrk-$label-c10-$round.txt"
    taskset -c "$LOAD_CPU" wrk "${args[@]}" -c1 -d"$DURATION"s "$url" > "$OUT/wrk-$label-c1-$round.txt"
    echo "round $round $label: $(grep -h 'Requests/sec' "$OUT/wrk-$label-c10-$round.txt" | xargs)" >&2
  done
done

python3 - "$OUT" "$ROUNDS" <<'PY'
import re, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
def rps(f): return float(re.search(r"Requests/sec:\s+([\d.]+)", open(f).read()).group(1))
def p50_us(f):
    m = re.search(r"50%\s+([\d.]+)(us|ms|s)\b", open(f).read())
    return float(m.group(1)) * {"us": 1, "ms": 1e3, "s": 1e6}[m.group(2)]
labels = ["noauth", "jwt_authn-cache", "module"]
thr = {l: statistics.median(rps(f"{out}/wrk-{l}-c10-{r}.txt") for r in range(1, rounds + 1)) for l in labels}
lat = {l: statistics.median(p50_us(f"{out}/wrk-{l}-c1-{r}.txt") for r in range(1, rounds + 1)) for l in labels}
print(f"Envoy 1.40, 1 worker, direct_response; wrk -t1; medians of {rounds} rounds")
print(f"{'variant':<17}{'req/s (c10)':>12}{'vs noauth':>11}{'p50 c1 (us)':>13}{'added p50':>11}")
for l in labels:
    print(f"{l:<17}{thr[l]:>12.0f}{thr[l] / thr['noauth']:>10.2f}x{lat[l]:>13.0f}{lat[l] - lat['noauth']:>10.0f}us")
print(f"module vs jwt_authn-cache: {thr['module'] / thr['jwt_authn-cache']:.2f}x throughput")
PY
