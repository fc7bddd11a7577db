// A real OpenID provider for audgate's tests/oidc_provider.rs: npm's `oidc-provider` (OpenID
// Certified), configured only as far as the tests need — a client that gets JWT access tokens
// with the client_credentials grant, for an audience chosen by an RFC 8707 resource indicator.
//
//   node server.js --port PORT --keys-dir DIR --keys KID:ALG[,KID:ALG...]
//
// Issuer: http://127.0.0.1:PORT (discovery at /.well-known/openid-configuration, keys at /jwks).
// Signing keys: one per KID (ALG RS256 or ES256), published in the listed order. A key is made on
// first use and kept as DIR/KID.json (a private JWK, 0600, in the test's temp dir), so the test
// controls key ids across restarts: rotation = restart with a new KID first and the old one kept
// (the provider signs with the first key that fits the algorithm); realm re-creation = restart
// with only new KIDs. Prints one line starting with "ready" once it listens.

import { generateKeyPairSync } from 'node:crypto';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { parseArgs } from 'node:util';

import Provider, { errors } from 'oidc-provider';

const { values: args } = parseArgs({
  options: {
    port: { type: 'string', default: process.env.OIDC_PORT },
    'keys-dir': { type: 'string', default: process.env.OIDC_KEYS_DIR },
    keys: { type: 'string', default: process.env.OIDC_KEYS },
  },
});
if (!args.port || !args['keys-dir'] || !args.keys) {
  console.error('usage: node server.js --port PORT --keys-dir DIR --keys KID:ALG[,KID:ALG...]');
  process.exit(2);
}

// The one client the tests use (credentials are test-only constants; the Rust test has them too).
const CLIENT_ID = 'audgate-test-client';
const CLIENT_SECRET = 'audgate-test-secret-not-for-production';

// Resource indicator -> what the token for it carries. `audience` becomes `aud`; `alg` picks the
// signing key type. orders-es256 is the same audience signed with an EC key.
const RESOURCE_SERVERS = {
  'https://orders.example.com/': { audience: 'orders-api', scope: 'orders:read orders:write', alg: 'RS256' },
  'https://orders.example.com/es256': { audience: 'orders-api', scope: 'orders:read', alg: 'ES256' },
  'https://billing.example.com/': { audience: 'billing-api', scope: 'billing:read', alg: 'RS256' },
};

function loadOrCreateKey(kid, alg) {
  if (!/^[A-Za-z0-9._-]+$/.test(kid)) throw new Error(`kid ${JSON.stringify(kid)}: use letters, digits, . _ -`);
  const file = join(args['keys-dir'], `${kid}.json`);
  if (existsSync(file)) return JSON.parse(readFileSync(file, 'utf8'));
  const pair = alg === 'ES256'
    ? generateKeyPairSync('ec', { namedCurve: 'P-256' })
    : alg === 'RS256'
      ? generateKeyPairSync('rsa', { modulusLength: 2048 })
      : (() => { throw new Error(`kid ${kid}: alg must be RS256 or ES256, not ${alg}`); })();
  const jwk = { ...pair.privateKey.export({ format: 'jwk' }), kid, alg, use: 'sig' };
  writeFileSync(file, JSON.stringify(jwk), { mode: 0o600 });
  return jwk;
}

const keys = args.keys.split(',').map((spec) => {
  const [kid, alg = 'RS256'] = spec.split(':');
  return loadOrCreateKey(kid, alg);
});

const issuer = `http://127.0.0.1:${args.port}`;
const provider = new Provider(issuer, {
  // Signing keys: the test decides which kids exist and in which order.
  jwks: { keys },
  clients: [{
    client_id: CLIENT_ID,
    client_secret: CLIENT_SECRET,
    // Machine-to-machine only: no browser flow, so no redirect URIs or response types.
    grant_types: ['client_credentials'],
    response_types: [],
    redirect_uris: [],
    token_endpoint_auth_method: 'client_secret_basic',
  }],
  features: {
    // The grant the tests use to get tokens without a browser (RFC 6749 §4.4).
    clientCredentials: { enabled: true },
    // RFC 8707: the `resource` parameter picks the resource server, hence `aud` and the format.
    resourceIndicators: {
      enabled: true,
      // No `resource` in the request: no resource server (and so an opaque token, not for audgate).
      defaultResource: () => undefined,
      getResourceServerInfo: (ctx, resourceIndicator) => {
        const server = RESOURCE_SERVERS[resourceIndicator];
        if (!server) throw new errors.InvalidTarget(`unknown resource ${resourceIndicator}`);
        return {
          audience: server.audience,
          scope: server.scope,
          // What audgate verifies: a signed JWT (RFC 9068, header typ at+jwt), not an opaque handle.
          accessTokenFormat: 'jwt',
          accessTokenTTL: 300,
          jwt: { sign: { alg: server.alg } },
        };
      },
    },
    // The login/consent pages are never used here; keep them off.
    devInteractions: { enabled: false },
  },
  // No browser flow sets cookies here; a key anyway, or the provider warns at every start.
  cookies: { keys: ['audgate-test-cookie-key-not-for-production'] },
  // Client-credentials tokens live as long as the resource server says (silences a warning).
  ttl: { ClientCredentials: (ctx, token) => token.resourceServer?.accessTokenTTL ?? 300 },
});

provider.listen(Number(args.port), '127.0.0.1', () => {
  console.log(`ready ${issuer} kids=${keys.map((k) => k.kid).join(',')}`);
});
