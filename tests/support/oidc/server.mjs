// A real OpenID provider (the certified `oidc-provider` package) for
// stepgate's identity tests. It issues RS256 JWT access tokens by the
// client_credentials grant with a resource indicator, publishes discovery
// and a JWKS, and can rotate its signing keys while running.
//
// Usage: node server.mjs (--port PORT | --listen-fd FD) --state DIR [--tls-cert F --tls-key F]
//   --port 0 picks a free port; --listen-fd serves on a listening socket
//   the caller bound on 127.0.0.1 and passed as that descriptor (the tests
//   pass it as stdin, so no other process can take the port in between).
//   The line `listening <issuer>` on stdout says it is ready. Keys live in DIR/keys.json, so a provider restarted on the
//   same port and DIR serves the same keys.
//
// The "user" is chosen by the test: the token request's `test_claims` form
// field (JSON) is merged into the access token (sub, email, amr, acr,
// auth_time, sid, ...), the way an IdP puts what the sign-in proved there.
//
// Test controls, outside the provider's own routes:
//   POST /_test/rotate[?keep=0]  new signing key first; keep=0 drops the old ones
//   POST /_test/jwks-max-age?s=N Cache-Control: max-age=N on the JWKS (N<0: none)
//   GET  /_test/stats            {"jwks_requests": N, "kids": [...]}

import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as http from 'node:http';
import * as https from 'node:https';
import * as path from 'node:path';

import Provider from 'oidc-provider';

const args = Object.fromEntries(
  process.argv.slice(2).reduce((pairs, a, i, all) => {
    if (a.startsWith('--')) pairs.push([a.slice(2), all[i + 1]]);
    return pairs;
  }, []),
);
const stateDir = args.state;
if (!stateDir) {
  console.error('usage: server.mjs (--port PORT | --listen-fd FD) --state DIR [--tls-cert F --tls-key F]');
  process.exit(2);
}
const keysFile = path.join(stateDir, 'keys.json');

const CLIENT_ID = 'stepgate-tests';
const CLIENT_SECRET = 'stepgate-tests-secret-0123456789abcdef';

function newKey() {
  const { privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
  const jwk = privateKey.export({ format: 'jwk' });
  return { ...jwk, kid: crypto.randomBytes(8).toString('hex'), alg: 'RS256', use: 'sig' };
}

function loadKeys() {
  try {
    return JSON.parse(fs.readFileSync(keysFile, 'utf8'));
  } catch {
    const keys = [newKey()];
    saveKeys(keys);
    return keys;
  }
}

function saveKeys(keys) {
  fs.writeFileSync(keysFile, JSON.stringify(keys), { mode: 0o600 });
}

let keys = loadKeys();
let jwksMaxAge = -1;
let jwksRequests = 0;
let handle;

function build(issuer) {
  const p = new Provider(issuer, {
    jwks: { keys },
    cookies: { keys: ['stepgate-tests-cookie-key'] },
    clients: [
      {
        client_id: CLIENT_ID,
        client_secret: CLIENT_SECRET,
        grant_types: ['client_credentials'],
        redirect_uris: [],
        response_types: [],
      },
    ],
    features: {
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      resourceIndicators: {
        enabled: true,
        defaultResource: () => undefined,
        useGrantedResource: () => true,
        getResourceServerInfo: (ctx, resource) => ({
          scope: 'api',
          audience: resource,
          accessTokenTTL: 3600,
          accessTokenFormat: 'jwt',
          jwt: { sign: { alg: 'RS256' } },
        }),
      },
    },
    formats: {
      customizers: {
        // What the sign-in proved, as the test wants it this time.
        async jwt(ctx, token, jwt) {
          const raw = ctx?.oidc?.body?.test_claims;
          if (!raw) return;
          const claims = JSON.parse(raw);
          for (const [k, v] of Object.entries(claims)) {
            if (!['iss', 'aud', 'exp', 'iat', 'jti'].includes(k)) jwt.payload[k] = v;
          }
        },
      },
    },
  });
  p.use(async (ctx, next) => {
    await next();
    if (ctx.path === '/jwks') {
      jwksRequests += 1;
      if (jwksMaxAge >= 0) ctx.set('cache-control', `public, max-age=${jwksMaxAge}`);
    }
  });
  // Quiet: errors are answered to the client; the test reads those.
  p.on('server_error', (ctx, err) => console.error('server_error', err));
  return p;
}

function control(req, res, issuer) {
  const url = new URL(req.url, issuer);
  const reply = (status, body) => {
    res.writeHead(status, { 'content-type': 'application/json' });
    res.end(JSON.stringify(body));
  };
  if (req.method === 'POST' && url.pathname === '/_test/rotate') {
    const key = newKey();
    keys = url.searchParams.get('keep') === '0' ? [key] : [key, ...keys];
    saveKeys(keys);
    handle = build(issuer).callback();
    return reply(200, { kid: key.kid, kids: keys.map((k) => k.kid) });
  }
  if (req.method === 'POST' && url.pathname === '/_test/jwks-max-age') {
    jwksMaxAge = Number(url.searchParams.get('s') ?? '-1');
    return reply(200, { max_age: jwksMaxAge });
  }
  if (req.method === 'GET' && url.pathname === '/_test/stats') {
    return reply(200, { jwks_requests: jwksRequests, kids: keys.map((k) => k.kid) });
  }
  return reply(404, { error: 'not_found' });
}

const tls = args['tls-cert']
  ? { cert: fs.readFileSync(args['tls-cert']), key: fs.readFileSync(args['tls-key']) }
  : null;
let issuer;
const handler = (req, res) => {
  if (req.url.startsWith('/_test/')) return control(req, res, issuer);
  return handle(req, res);
};
const server = tls ? https.createServer(tls, handler) : http.createServer(handler);
const ready = () => {
  const { port } = server.address();
  issuer = `${tls ? 'https://localhost' : 'http://127.0.0.1'}:${port}`;
  handle = build(issuer).callback();
  console.log(`listening ${issuer}`);
};
if (args['listen-fd'] !== undefined) {
  server.listen({ fd: Number(args['listen-fd']) }, ready);
} else {
  server.listen(Number(args.port ?? 0), '127.0.0.1', ready);
}
const stop = () => server.close(() => process.exit(0));
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
