#!/usr/bin/env node
// Checks sts.mjs against its contract (README.md) before any Rust test relies on it: it starts
// the STS as a child process (two of them, as two trust domains, for the ID-JAG, JWT-grant and
// jwt-bearer flows), talks to it over HTTP only, and verifies every token it gets back with the
// STS's published JWKS. Exits non-zero on any failure; the last line is
// "N passed, M failed".
//
// Usage: node tests/interop/selftest.mjs   (STS_SELFTEST_VERBOSE=1 also prints the STS's stderr)

import { spawn } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:http';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { strict as assert } from 'node:assert';

import {
  createLocalJWKSet,
  decodeJwt,
  decodeProtectedHeader,
  exportJWK,
  generateKeyPair,
  jwtVerify,
  SignJWT,
} from 'jose';

const HERE = dirname(fileURLToPath(import.meta.url));
const STS = join(HERE, 'sts.mjs');
const VERBOSE = !!process.env.STS_SELFTEST_VERBOSE;

const TE = 'urn:ietf:params:oauth:grant-type:token-exchange';
const AT = 'urn:ietf:params:oauth:token-type:access_token';
const JWT_TYPE = 'urn:ietf:params:oauth:token-type:jwt';
const ORDERS = 'https://orders.example.com';
const BILLING = 'https://billing.example.com';

// ---------------------------------------------------------------------------------------------
// Tiny runner

let passed = 0;
let failed = 0;

async function check(name, fn) {
  try {
    await fn();
    passed += 1;
    console.log(`ok   - ${name}`);
  } catch (err) {
    failed += 1;
    console.log(`FAIL - ${name}\n       ${String(err?.stack ?? err).split('\n').join('\n       ')}`);
  }
}

// ---------------------------------------------------------------------------------------------
// Child process handling

function startSts(config) {
  const dir = mkdtempSync(join(tmpdir(), 'txgate-sts-'));
  const file = join(dir, 'config.json');
  writeFileSync(file, JSON.stringify(config, null, 2));

  const child = spawn(process.execPath, [STS, '--port', '0', '--config', file], {
    stdio: ['pipe', 'pipe', 'pipe'],
  });
  const sts = {
    child, dir, stdout: '', stderr: '', exited: null,
  };
  child.stderr.setEncoding('utf8');
  child.stderr.on('data', (chunk) => {
    sts.stderr += chunk;
    if (VERBOSE) process.stderr.write(chunk);
  });
  sts.exit = new Promise((resolve) => {
    child.on('exit', (code, signal) => {
      sts.exited = { code, signal };
      resolve(sts.exited);
    });
  });

  sts.ready = new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`STS not ready after 20 s; stderr:\n${sts.stderr}`)), 20_000);
    child.stdout.setEncoding('utf8');
    child.stdout.on('data', (chunk) => {
      sts.stdout += chunk;
      const nl = sts.stdout.indexOf('\n');
      if (nl >= 0 && !sts.readyLine) {
        sts.readyLine = sts.stdout.slice(0, nl);
        clearTimeout(timer);
        try {
          resolve(JSON.parse(sts.readyLine));
        } catch (err) {
          reject(new Error(`readiness line is not JSON: ${sts.readyLine} (${err.message})`));
        }
      }
    });
    sts.exit.then((how) => {
      clearTimeout(timer);
      reject(new Error(`STS exited early ${JSON.stringify(how)}; stderr:\n${sts.stderr}`));
    });
  });
  return sts;
}

async function stopSts(sts) {
  if (!sts.exited) sts.child.kill('SIGTERM');
  await Promise.race([sts.exit, new Promise((r) => { setTimeout(r, 5000); })]);
  if (!sts.exited) sts.child.kill('SIGKILL');
  rmSync(sts.dir, { recursive: true, force: true });
}

function waitExit(sts, ms) {
  return Promise.race([
    sts.exit,
    new Promise((_, reject) => { setTimeout(() => reject(new Error(`no exit within ${ms} ms`)), ms); }),
  ]);
}

// ---------------------------------------------------------------------------------------------
// HTTP helpers

async function getJson(url) {
  const res = await fetch(url);
  return { status: res.status, body: await res.json() };
}

async function postForm(url, form, { basic } = {}) {
  const body = new URLSearchParams();
  for (const [k, v] of Object.entries(form)) {
    for (const item of Array.isArray(v) ? v : [v]) {
      if (item !== undefined) body.append(k, item);
    }
  }
  const headers = { 'content-type': 'application/x-www-form-urlencoded', accept: 'application/json' };
  if (basic) {
    // RFC 6749 §2.3.1: form-urlencode id and secret before base64.
    const enc = (s) => encodeURIComponent(s).replace(/%20/g, '+');
    headers.authorization = `Basic ${Buffer.from(`${enc(basic[0])}:${enc(basic[1])}`).toString('base64')}`;
  }
  const res = await fetch(url, { method: 'POST', headers, body });
  const text = await res.text();
  let json;
  try {
    json = JSON.parse(text);
  } catch {
    json = { raw: text };
  }
  return { status: res.status, body: json, headers: res.headers };
}

function expectOAuthError(res, status, error) {
  assert.equal(res.body.error, error, `expected ${error}, got ${JSON.stringify(res.body)}`);
  assert.equal(res.status, status, `expected HTTP ${status} for ${error}, got ${res.status}`);
}

// ---------------------------------------------------------------------------------------------

async function main() {
  const { publicKey: pkjwtPublic, privateKey: pkjwtPrivate } = await generateKeyPair('ES256', { extractable: true });
  const pkjwtJwk = { ...(await exportJWK(pkjwtPublic)), kid: 'pkjwt-1', alg: 'ES256', use: 'sig' };

  const config = {
    clients: [
      { client_id: 'gateway', client_secret: 's3cret', auth_method: 'client_secret_basic' },
      { client_id: 'gateway-post', client_secret: 's3cret', auth_method: 'client_secret_post' },
      { client_id: 'gateway-pkjwt', auth_method: 'private_key_jwt', jwks: { keys: [pkjwtJwk] } },
      { client_id: 'user-app', client_secret: 'user-secret', auth_method: 'client_secret_basic' },
    ],
    resources: [ORDERS, BILLING],
  };

  const sts = startSts(config);
  let meta;
  let disco;
  try {
    await check('prints one JSON readiness line {issuer, port} on stdout', async () => {
      meta = await sts.ready;
      assert.deepEqual(Object.keys(meta).sort(), ['issuer', 'port']);
      assert.ok(Number.isInteger(meta.port) && meta.port > 0);
      assert.equal(meta.issuer, `http://127.0.0.1:${meta.port}`);
    });
    if (!meta) throw new Error('STS did not start; nothing else can run');
    const { issuer } = meta;

    await check('discovery lists token, jwks and introspection endpoints and the grants', async () => {
      const res = await getJson(`${issuer}/.well-known/openid-configuration`);
      assert.equal(res.status, 200);
      disco = res.body;
      assert.equal(disco.issuer, issuer);
      for (const key of ['token_endpoint', 'jwks_uri', 'introspection_endpoint']) {
        assert.ok(disco[key]?.startsWith(`${issuer}/`), `${key}: ${disco[key]}`);
      }
      assert.ok(disco.grant_types_supported.includes('client_credentials'));
      assert.ok(disco.grant_types_supported.includes(TE));
      assert.ok(disco.token_endpoint_auth_methods_supported.includes('private_key_jwt'));
    });
    if (!disco) throw new Error('no discovery document; nothing else can run');
    const tokenUrl = disco.token_endpoint;

    async function jwks() {
      const res = await getJson(disco.jwks_uri);
      assert.equal(res.status, 200);
      return res.body;
    }
    async function verify(token) {
      return jwtVerify(token, createLocalJWKSet(await jwks()), { issuer });
    }
    async function clientCredentials(resource, scope, auth = ['user-app', 'user-secret']) {
      const res = await postForm(tokenUrl, { grant_type: 'client_credentials', resource, scope }, { basic: auth });
      assert.equal(res.status, 200, JSON.stringify(res.body));
      return res.body.access_token;
    }
    async function assertion(clientId) {
      return new SignJWT({})
        .setProtectedHeader({ alg: 'ES256', kid: 'pkjwt-1' })
        .setIssuer(clientId)
        .setSubject(clientId)
        .setAudience(tokenUrl)
        .setJti(randomUUID())
        .setIssuedAt()
        .setExpirationTime('60s')
        .sign(pkjwtPrivate);
    }
    const exchange = (form, opts = { basic: ['gateway', 's3cret'] }) => postForm(tokenUrl, { grant_type: TE, ...form }, opts);

    await check('JWKS publishes the current signing key', async () => {
      const set = await jwks();
      const kids = await getJson(`${issuer}/__test/kids`);
      assert.equal(set.keys.length, 1);
      assert.equal(set.keys[0].kid, kids.body.current);
      assert.deepEqual(kids.body.all, [kids.body.current]);
      assert.equal(set.keys[0].d, undefined, 'private part must not be published');
    });

    let userToken;
    await check('client_credentials (user-app, resource=orders) returns a JWT access token', async () => {
      const res = await postForm(tokenUrl, { grant_type: 'client_credentials', resource: ORDERS, scope: 'orders:read orders:write' }, { basic: ['user-app', 'user-secret'] });
      assert.equal(res.status, 200, JSON.stringify(res.body));
      assert.equal(res.body.token_type, 'Bearer');
      assert.equal(res.body.scope, 'orders:read orders:write');
      assert.ok(res.body.expires_in > 0);
      userToken = res.body.access_token;
      const { payload, protectedHeader } = await verify(userToken);
      assert.equal(protectedHeader.typ, 'at+jwt');
      assert.equal(protectedHeader.alg, 'RS256');
      assert.equal(payload.sub, 'user-app');
      assert.equal(payload.client_id, 'user-app');
      assert.equal(payload.aud, ORDERS);
      assert.equal(payload.scope, 'orders:read orders:write');
      assert.ok(payload.exp > payload.iat && payload.jti);
      console.log(`       client_credentials token: ${JSON.stringify({ header: protectedHeader, payload })}`);
    });

    await check('client_credentials accepts audience= instead of resource=', async () => {
      const res = await postForm(tokenUrl, { grant_type: 'client_credentials', audience: BILLING, scope: 'billing:read' }, { basic: ['user-app', 'user-secret'] });
      assert.equal(res.status, 200, JSON.stringify(res.body));
      const { payload } = await verify(res.body.access_token);
      assert.equal(payload.aud, BILLING);
      assert.equal(payload.scope, 'billing:read');
    });

    await check('client_credentials with an unknown resource is invalid_target', async () => {
      const res = await postForm(tokenUrl, { grant_type: 'client_credentials', resource: 'https://unknown.example.com' }, { basic: ['user-app', 'user-secret'] });
      expectOAuthError(res, 400, 'invalid_target');
    });

    await check('wrong client secret is invalid_client (401)', async () => {
      const res = await exchange({ subject_token: userToken, subject_token_type: AT, audience: BILLING }, { basic: ['gateway', 'nope'] });
      expectOAuthError(res, 401, 'invalid_client');
    });

    await check('token exchange, client_secret_basic', async () => {
      const res = await exchange({
        subject_token: userToken, subject_token_type: AT, audience: BILLING, scope: 'billing:read',
      });
      assert.equal(res.status, 200, JSON.stringify(res.body));
      assert.equal(res.body.issued_token_type, AT);
      assert.equal(res.body.token_type, 'Bearer');
      assert.equal(res.body.expires_in, 300);
      assert.equal(res.body.scope, 'billing:read');
      assert.equal(res.headers.get('cache-control'), 'no-store');
      const { payload, protectedHeader } = await verify(res.body.access_token);
      assert.equal(payload.sub, 'user-app');
      assert.equal(payload.aud, BILLING);
      assert.equal(payload.client_id, 'gateway');
      assert.equal(payload.scope, 'billing:read');
      assert.equal(payload.iss, issuer);
      assert.equal(payload.act, undefined);
      // oidc-provider reads the clock twice (iat, exp), so a second boundary may fall between.
      assert.ok(payload.jti && payload.iat && Math.abs(payload.exp - payload.iat - 300) <= 1);
      console.log(`       exchanged token: ${JSON.stringify({ header: protectedHeader, payload })}`);
    });

    await check('token exchange, client_secret_post, resource= and jwt token types', async () => {
      const res = await exchange({
        client_id: 'gateway-post',
        client_secret: 's3cret',
        subject_token: userToken,
        subject_token_type: JWT_TYPE,
        requested_token_type: JWT_TYPE,
        resource: ORDERS,
        scope: 'orders:read',
      }, {});
      assert.equal(res.status, 200, JSON.stringify(res.body));
      assert.equal(res.body.issued_token_type, JWT_TYPE);
      const { payload } = await verify(res.body.access_token);
      assert.equal(payload.client_id, 'gateway-post');
      assert.equal(payload.aud, ORDERS);
      assert.equal(payload.sub, 'user-app');
    });

    await check('token exchange, private_key_jwt client assertion (RFC 7523)', async () => {
      const clientAssertion = await assertion('gateway-pkjwt');
      const form = {
        client_id: 'gateway-pkjwt',
        client_assertion_type: 'urn:ietf:params:oauth:client-assertion-type:jwt-bearer',
        client_assertion: clientAssertion,
        subject_token: userToken,
        subject_token_type: AT,
        audience: ORDERS,
        scope: 'orders:read',
      };
      const res = await exchange(form, {});
      assert.equal(res.status, 200, JSON.stringify(res.body));
      const { payload } = await verify(res.body.access_token);
      assert.equal(payload.client_id, 'gateway-pkjwt');
      assert.equal(payload.sub, 'user-app');

      const replay = await exchange(form, {});
      expectOAuthError(replay, 401, 'invalid_client');
    });

    await check('client_secret_post is accepted for a client registered as client_secret_basic', async () => {
      // oidc-provider treats the two secret methods as one; tests must look at presented_auth.
      const res = await exchange({
        client_id: 'gateway', client_secret: 's3cret', subject_token: userToken, subject_token_type: AT, audience: ORDERS,
      }, {});
      assert.equal(res.status, 200, JSON.stringify(res.body));
    });

    await check('two client authentication mechanisms at once is invalid_request', async () => {
      const res = await exchange({
        client_secret: 's3cret', subject_token: userToken, subject_token_type: AT, audience: ORDERS,
      });
      expectOAuthError(res, 400, 'invalid_request');
    });

    let actorToken;
    let delegated;
    await check('delegation: actor_token yields act {sub: actor}', async () => {
      actorToken = await clientCredentials(ORDERS, 'orders:read', ['gateway', 's3cret']);
      const res = await exchange({
        subject_token: userToken, subject_token_type: AT, actor_token: actorToken, actor_token_type: AT, audience: ORDERS, scope: 'orders:read',
      });
      assert.equal(res.status, 200, JSON.stringify(res.body));
      delegated = res.body.access_token;
      const { payload } = await verify(delegated);
      assert.equal(payload.sub, 'user-app');
      assert.deepEqual(payload.act, { sub: 'gateway' });
      console.log(`       delegated token payload: ${JSON.stringify(payload)}`);
    });

    await check('delegation: an actor token that carries act is nested', async () => {
      const res = await exchange({
        subject_token: userToken, subject_token_type: AT, actor_token: delegated, actor_token_type: AT, audience: BILLING,
      });
      assert.equal(res.status, 200, JSON.stringify(res.body));
      const { payload } = await verify(res.body.access_token);
      assert.deepEqual(payload.act, { sub: 'user-app', act: { sub: 'gateway' } });
      // No scope requested: the subject's scopes carry over.
      assert.equal(payload.scope, 'orders:read orders:write');
      assert.equal(res.body.scope, 'orders:read orders:write');
    });

    await check('invalid subject_token is invalid_grant', async () => {
      expectOAuthError(await exchange({ subject_token: 'not-a-jwt', subject_token_type: AT, audience: ORDERS }), 400, 'invalid_grant');
      // Right shape and issuer, wrong key.
      const { privateKey } = await generateKeyPair('RS256');
      const forged = await new SignJWT({ client_id: 'user-app' })
        .setProtectedHeader({ alg: 'RS256', kid: decodeProtectedHeader(userToken).kid })
        .setIssuer(issuer).setSubject('mallory').setAudience(ORDERS)
        .setIssuedAt().setExpirationTime('5m')
        .sign(privateKey);
      expectOAuthError(await exchange({ subject_token: forged, subject_token_type: AT, audience: ORDERS }), 400, 'invalid_grant');
      // Tampered payload.
      const [h, , s] = userToken.split('.');
      const body = Buffer.from(JSON.stringify({ ...decodeJwt(userToken), sub: 'mallory' })).toString('base64url');
      expectOAuthError(await exchange({ subject_token: `${h}.${body}.${s}`, subject_token_type: AT, audience: ORDERS }), 400, 'invalid_grant');
    });

    await check('invalid actor_token is invalid_grant', async () => {
      const res = await exchange({
        subject_token: userToken, subject_token_type: AT, actor_token: 'garbage', actor_token_type: AT, audience: ORDERS,
      });
      expectOAuthError(res, 400, 'invalid_grant');
    });

    await check('malformed requests are invalid_request', async () => {
      expectOAuthError(await exchange({ subject_token_type: AT, audience: ORDERS }), 400, 'invalid_request');
      expectOAuthError(await exchange({ subject_token: userToken, audience: ORDERS }), 400, 'invalid_request');
      expectOAuthError(await exchange({ subject_token: userToken, subject_token_type: 'urn:x:unknown', audience: ORDERS }), 400, 'invalid_request');
      expectOAuthError(await exchange({
        subject_token: userToken, subject_token_type: AT, actor_token: actorToken, audience: ORDERS,
      }), 400, 'invalid_request');
      expectOAuthError(await exchange({
        subject_token: userToken, subject_token_type: AT, actor_token_type: AT, audience: ORDERS,
      }), 400, 'invalid_request');
      expectOAuthError(await exchange({
        subject_token: userToken, subject_token_type: AT, requested_token_type: 'urn:ietf:params:oauth:token-type:refresh_token', audience: ORDERS,
      }), 400, 'invalid_request');
      expectOAuthError(await exchange({
        subject_token: [userToken, userToken], subject_token_type: AT, audience: ORDERS,
      }), 400, 'invalid_request');
    });

    await check('unknown or missing audience is invalid_target', async () => {
      expectOAuthError(await exchange({ subject_token: userToken, subject_token_type: AT, audience: 'https://unknown.example.com' }), 400, 'invalid_target');
      expectOAuthError(await exchange({ subject_token: userToken, subject_token_type: AT }), 400, 'invalid_target');
      expectOAuthError(await exchange({
        subject_token: userToken, subject_token_type: AT, audience: ORDERS, resource: BILLING,
      }), 400, 'invalid_target');
    });

    await check('unknown targets next to a known one are ignored', async () => {
      const res = await exchange({
        subject_token: userToken, subject_token_type: AT, audience: ['https://unknown.example.com', ORDERS],
      });
      assert.equal(res.status, 200, JSON.stringify(res.body));
      assert.equal(decodeJwt(res.body.access_token).aud, ORDERS);
    });

    await check('unknown scope is invalid_scope', async () => {
      expectOAuthError(await exchange({
        subject_token: userToken, subject_token_type: AT, audience: ORDERS, scope: 'orders:read admin',
      }), 400, 'invalid_scope');
    });

    await check('introspection of a JWT access token is unsupported_token_type', async () => {
      const res = await postForm(disco.introspection_endpoint, { token: userToken }, { basic: ['gateway', 's3cret'] });
      expectOAuthError(res, 400, 'unsupported_token_type');
    });

    await check('/__test/exchanges records requests without client secrets or assertions', async () => {
      const { status, body } = await getJson(`${issuer}/__test/exchanges`);
      assert.equal(status, 200);
      assert.ok(Array.isArray(body) && body.length >= 10, `got ${body.length}`);
      for (const e of body) {
        assert.equal(e.params.client_secret, undefined);
        assert.equal(e.params.client_assertion, undefined);
        assert.equal(e.params.grant_type, TE);
      }
      const basic = body.find((e) => e.status === 200 && e.client_id === 'gateway' && e.issued?.aud === BILLING && !e.issued.act);
      assert.ok(basic, 'basic-auth exchange recorded');
      assert.equal(basic.client_auth_method, 'client_secret_basic');
      assert.equal(basic.presented_auth, 'client_secret_basic');
      assert.equal(basic.params.subject_token, userToken);
      assert.equal(basic.issued.sub, 'user-app');
      const post = body.find((e) => e.client_id === 'gateway-post');
      assert.equal(post.client_auth_method, 'client_secret_post');
      assert.equal(post.params.client_id, 'gateway-post');
      assert.equal(post.presented_auth, 'client_secret_post');
      const pk = body.find((e) => e.client_id === 'gateway-pkjwt' && e.status === 200);
      assert.equal(pk.client_auth_method, 'private_key_jwt');
      assert.equal(pk.params.client_assertion_type, 'urn:ietf:params:oauth:client-assertion-type:jwt-bearer');
      assert.equal(pk.presented_auth, 'client_assertion');
      const replay = body.find((e) => e.error === 'invalid_client' && e.params.client_id === 'gateway-pkjwt');
      assert.ok(replay && replay.client_id === null, 'failed client auth recorded without an authenticated client');
      const act = body.find((e) => e.issued?.act?.sub === 'gateway');
      assert.ok(act && act.actor.sub === 'gateway');
      const bad = body.find((e) => e.error === 'invalid_target');
      assert.ok(bad && bad.issued === null && bad.status === 400);
      const ignored = body.find((e) => e.ignored_targets.length === 1);
      assert.deepEqual(ignored.ignored_targets, ['https://unknown.example.com']);
      console.log(`       sample exchange record: ${JSON.stringify({ ...act, params: { ...act.params, subject_token: '<jwt>', actor_token: '<jwt>' } })}`);
    });

    await check('DELETE /__test/exchanges clears the log', async () => {
      const res = await fetch(`${issuer}/__test/exchanges`, { method: 'DELETE' });
      const body = await res.json();
      assert.ok(body.cleared > 0);
      assert.deepEqual((await getJson(`${issuer}/__test/exchanges`)).body, []);
    });

    await check('rotation: new kid is current, old key stays published, old tokens still verify', async () => {
      const before = (await getJson(`${issuer}/__test/kids`)).body;
      const oldJwks = await jwks();
      const rot = await fetch(`${issuer}/__test/rotate`, { method: 'POST' });
      assert.equal(rot.status, 200);
      const { kid } = await rot.json();
      assert.ok(kid && kid !== before.current);

      const after = (await getJson(`${issuer}/__test/kids`)).body;
      assert.equal(after.current, kid);
      assert.deepEqual(after.all, [kid, before.current]);
      const set = await jwks();
      assert.deepEqual(set.keys.map((k) => k.kid).sort(), [kid, before.current].sort());

      const fresh = await clientCredentials(ORDERS, 'orders:read');
      assert.equal(decodeProtectedHeader(fresh).kid, kid);
      await verify(fresh);
      await assert.rejects(jwtVerify(fresh, createLocalJWKSet(oldJwks)), 'new token must not verify with the pre-rotation JWKS');

      assert.equal(decodeProtectedHeader(userToken).kid, before.current);
      await verify(userToken);

      // A subject token signed before the rotation is still accepted; the result uses the new key.
      const res = await exchange({ subject_token: userToken, subject_token_type: AT, audience: ORDERS });
      assert.equal(res.status, 200, JSON.stringify(res.body));
      assert.equal(decodeProtectedHeader(res.body.access_token).kid, kid);
      await verify(res.body.access_token);

      const again = (await (await fetch(`${issuer}/__test/rotate`, { method: 'POST' })).json()).kid;
      assert.equal((await jwks()).keys.length, 3);
      assert.equal(decodeProtectedHeader(await clientCredentials(BILLING, 'billing:read')).kid, again);
    });

    await check('discovery still serves the same endpoints after rotation', async () => {
      const res = await getJson(`${issuer}/.well-known/openid-configuration`);
      assert.equal(res.body.jwks_uri, disco.jwks_uri);
      assert.equal(res.body.token_endpoint, tokenUrl);
    });

    await check('nothing but the readiness line was written to stdout', async () => {
      assert.equal(sts.stdout, `${sts.readyLine}\n`);
    });

    await check('exits on SIGTERM', async () => {
      sts.child.kill('SIGTERM');
      const how = await waitExit(sts, 5000);
      assert.ok(how.code === 0 || how.signal === 'SIGTERM', JSON.stringify(how));
    });
  } finally {
    await stopSts(sts);
    if (failed && !VERBOSE) process.stderr.write(`--- STS stderr ---\n${sts.stderr}\n---\n`);
  }

  // A second instance: ES256 keys, 1-second client_credentials tokens, and a parent that goes
  // away by closing stdin.
  const short = startSts({
    ...config,
    clients: [config.clients[0], config.clients[3]],
    signing_alg: 'ES256',
    ttl: { client_credentials: 1 },
  });
  try {
    const { issuer } = await short.ready;
    const disco2 = (await getJson(`${issuer}/.well-known/openid-configuration`)).body;
    let token;
    await check('signing_alg ES256 issues ES256 tokens', async () => {
      const res = await postForm(disco2.token_endpoint, { grant_type: 'client_credentials', resource: ORDERS, scope: 'orders:read' }, { basic: ['user-app', 'user-secret'] });
      assert.equal(res.status, 200, JSON.stringify(res.body));
      token = res.body.access_token;
      assert.equal(decodeProtectedHeader(token).alg, 'ES256');
      const keys = (await getJson(disco2.jwks_uri)).body;
      // The token lives one second; check the signature as of its issue time.
      await jwtVerify(token, createLocalJWKSet(keys), { issuer, currentDate: new Date(decodeJwt(token).iat * 1000) });
      assert.equal(keys.keys[0].kty, 'EC');
    });

    await check('expired subject_token is invalid_grant', async () => {
      await new Promise((r) => { setTimeout(r, 2100); });
      const res = await postForm(disco2.token_endpoint, {
        grant_type: TE, subject_token: token, subject_token_type: AT, audience: ORDERS,
      }, { basic: ['gateway', 's3cret'] });
      expectOAuthError(res, 400, 'invalid_grant');
      assert.match(res.body.error_description, /expired/);
    });

    await check('exits when stdin closes', async () => {
      short.child.stdin.end();
      const how = await waitExit(short, 5000);
      assert.equal(how.code, 0, JSON.stringify(how));
    });
  } finally {
    await stopSts(short);
    if (failed && !VERBOSE) process.stderr.write(`--- STS (second instance) stderr ---\n${short.stderr}\n---\n`);
  }

  await twoTrustDomains();
}

// ---------------------------------------------------------------------------------------------
// Two processes as two trust domains. A is the user's IdP: it issues user tokens, ID-JAGs, JWT
// grants and Transaction Tokens. B trusts A (and T, an issuer this script plays itself, to sign
// assertions A would never issue) and redeems their assertions with the jwt-bearer grant.

const JWT_BEARER = 'urn:ietf:params:oauth:grant-type:jwt-bearer';
const ID_JAG = 'urn:ietf:params:oauth:token-type:id-jag';
const TXN_TOKEN = 'urn:ietf:params:oauth:token-type:txn_token';
const API_B = 'https://api.b.example';

// Serves a JWKS at /jwks on 127.0.0.1:0; the private key signs assertions.
async function startTestIssuer() {
  const { publicKey, privateKey } = await generateKeyPair('ES256', { extractable: true });
  const jwk = { ...(await exportJWK(publicKey)), kid: 'test-issuer-1', alg: 'ES256', use: 'sig' };
  const server = createServer((req, res) => {
    res.writeHead(req.url === '/jwks' ? 200 : 404, { 'content-type': 'application/json' });
    res.end(req.url === '/jwks' ? JSON.stringify({ keys: [jwk] }) : '{}');
  });
  await new Promise((resolve) => { server.listen(0, '127.0.0.1', resolve); });
  const issuer = `http://127.0.0.1:${server.address().port}`;
  const sign = (claims, { typ = 'JWT', exp = '60s', iss = issuer } = {}) => new SignJWT(claims)
    .setProtectedHeader({ alg: 'ES256', kid: jwk.kid, typ })
    .setIssuer(iss)
    .setIssuedAt()
    .setJti(randomUUID())
    .setExpirationTime(exp)
    .sign(privateKey);
  return {
    issuer, jwksUri: `${issuer}/jwks`, sign, close: () => new Promise((r) => { server.close(r); }),
  };
}

async function twoTrustDomains() {
  const testIssuer = await startTestIssuer();
  const a = startSts({
    clients: [
      { client_id: 'gateway', client_secret: 's3cret' },
      { client_id: 'user-app', client_secret: 'user-secret' },
      { client_id: 'stepup-user', client_secret: 'user-secret' },
      { client_id: 'entra-user', client_secret: 'user-secret' },
      { client_id: 'consent-user', client_secret: 'user-secret' },
    ],
    resources: [ORDERS],
    step_up: {
      'stepup-user': { error: 'insufficient_user_authentication', acr_values: 'urn:example:mfa', max_age: 0 },
      'entra-user': {
        error: 'interaction_required',
        error_description: 'AADSTS50076: multi-factor authentication is required',
        claims: '{"access_token":{"capolids":{"essential":true,"values":["c1"]}}}',
      },
      'consent-user': { error: 'consent_required' },
    },
  });
  let b;
  try {
    const aMeta = await a.ready;
    b = startSts({
      clients: [
        { client_id: 'gateway', client_secret: 's3cret' },
        { client_id: 'other-app', client_secret: 'other-secret' },
      ],
      resources: [API_B],
      trusted_issuers: [
        { issuer: aMeta.issuer, jwks_uri: `${aMeta.issuer}/jwks` },
        { issuer: testIssuer.issuer, jwks_uri: testIssuer.jwksUri },
      ],
      step_up: { 'stepup-user': { error: 'insufficient_user_authentication', acr_values: 'urn:example:mfa', max_age: 300 } },
    });
    const bMeta = await b.ready;
    const aDisco = (await getJson(`${aMeta.issuer}/.well-known/openid-configuration`)).body;
    const bDisco = (await getJson(`${bMeta.issuer}/.well-known/openid-configuration`)).body;
    const gw = { basic: ['gateway', 's3cret'] };
    const atA = (form, opts = gw) => postForm(aDisco.token_endpoint, form, opts);
    const atB = (form, opts = gw) => postForm(bDisco.token_endpoint, form, opts);
    const verifyAt = async (disco, token, options = {}) => jwtVerify(token, createLocalJWKSet((await getJson(disco.jwks_uri)).body), { issuer: disco.issuer, ...options });
    const userTokenAt = async (clientId) => {
      const res = await atA({ grant_type: 'client_credentials', resource: ORDERS }, { basic: [clientId, 'user-secret'] });
      assert.equal(res.status, 200, JSON.stringify(res.body));
      return res.body.access_token;
    };
    const userToken = await userTokenAt('user-app');
    const exchangeAtA = (form, opts) => atA({
      grant_type: TE, subject_token: userToken, subject_token_type: AT, ...form,
    }, opts);

    await check('two domains: discovery lists the jwt-bearer grant', async () => {
      assert.ok(aDisco.grant_types_supported.includes(JWT_BEARER));
      assert.ok(bDisco.grant_types_supported.includes(JWT_BEARER));
      assert.ok(bDisco.grant_types_supported.includes(TE));
    });

    let idJag;
    await check('two domains: A issues an ID-JAG for B (typ oauth-id-jag+jwt, N_A, <= 300 s)', async () => {
      const res = await exchangeAtA({
        requested_token_type: ID_JAG, audience: bMeta.issuer, resource: API_B, scope: 'orders:read todo:write',
      });
      assert.equal(res.status, 200, JSON.stringify(res.body));
      assert.equal(res.body.issued_token_type, ID_JAG);
      assert.equal(res.body.token_type, 'N_A');
      assert.equal(res.body.expires_in, 300);
      assert.equal(res.body.scope, 'orders:read todo:write');
      assert.equal(res.headers.get('cache-control'), 'no-store');
      idJag = res.body.access_token;
      const { payload, protectedHeader } = await verifyAt(aDisco, idJag, { audience: bMeta.issuer });
      assert.equal(protectedHeader.typ, 'oauth-id-jag+jwt');
      assert.equal(payload.iss, aMeta.issuer);
      assert.equal(payload.sub, 'user-app');
      assert.equal(payload.aud, bMeta.issuer);
      assert.equal(payload.client_id, 'gateway');
      assert.equal(payload.resource, API_B);
      assert.equal(payload.scope, 'orders:read todo:write');
      assert.ok(payload.jti && payload.exp - payload.iat <= 300);
      console.log(`       ID-JAG: ${JSON.stringify({ header: protectedHeader, payload })}`);
    });

    await check('two domains: B redeems A\'s ID-JAG (jwt-bearer) for its own access token', async () => {
      const res = await atB({
        grant_type: JWT_BEARER, assertion: idJag, scope: 'orders:read', requested_token_use: 'on_behalf_of',
      });
      assert.equal(res.status, 200, JSON.stringify(res.body));
      assert.equal(res.body.issued_token_type, AT);
      assert.equal(res.body.token_type, 'Bearer');
      assert.ok(res.body.expires_in > 0);
      const { payload } = await verifyAt(bDisco, res.body.access_token);
      assert.equal(payload.iss, bMeta.issuer);
      assert.equal(payload.sub, 'user-app');
      assert.equal(payload.aud, API_B);
      assert.equal(payload.client_id, 'gateway');
      // The ID-JAG's scope, not the narrower request.
      assert.equal(payload.scope, 'orders:read todo:write');
      console.log(`       access token at B: ${JSON.stringify(payload)}`);
    });

    await check('two domains: an ID-JAG is refused for another client, a wider scope, or as a subject token', async () => {
      const other = await atB({ grant_type: JWT_BEARER, assertion: idJag }, { basic: ['other-app', 'other-secret'] });
      expectOAuthError(other, 400, 'invalid_grant');
      assert.match(other.body.error_description, /another client/);
      expectOAuthError(await atB({ grant_type: JWT_BEARER, assertion: idJag, scope: 'orders:read admin' }), 400, 'invalid_scope');
      expectOAuthError(await atA({ grant_type: TE, subject_token: idJag, subject_token_type: AT, audience: ORDERS }), 400, 'invalid_grant');
    });

    await check('two domains: a JWT grant (requested_token_type jwt) from A is redeemed at B', async () => {
      const res = await exchangeAtA({ requested_token_type: JWT_TYPE, audience: bMeta.issuer, scope: 'todo:read' });
      assert.equal(res.status, 200, JSON.stringify(res.body));
      assert.equal(res.body.issued_token_type, JWT_TYPE);
      assert.equal(res.body.token_type, 'N_A');
      const grant = res.body.access_token;
      const { payload, protectedHeader } = await verifyAt(aDisco, grant, { audience: bMeta.issuer });
      assert.equal(protectedHeader.typ, 'JWT');
      assert.equal(payload.sub, 'user-app');
      assert.equal(payload.client_id, 'gateway');
      assert.equal(payload.scope, 'todo:read');
      assert.ok(payload.jti);

      // Not an ID-JAG: audience and scope come from the request.
      const redeemed = await atB({
        grant_type: JWT_BEARER, assertion: grant, resource: API_B, scope: 'todo:read todo:write',
      }, { basic: ['other-app', 'other-secret'] });
      assert.equal(redeemed.status, 200, JSON.stringify(redeemed.body));
      const claims = (await verifyAt(bDisco, redeemed.body.access_token)).payload;
      assert.equal(claims.iss, bMeta.issuer);
      assert.equal(claims.sub, 'user-app');
      assert.equal(claims.aud, API_B);
      assert.equal(claims.scope, 'todo:read todo:write');
      assert.equal(claims.client_id, 'other-app');

      const bare = await atB({ grant_type: JWT_BEARER, assertion: grant });
      assert.equal(bare.status, 200, JSON.stringify(bare.body));
      assert.equal(decodeJwt(bare.body.access_token).aud, 'gateway');

      // With an actor token the JWT grant carries act, as access tokens do.
      const actor = (await atA({ grant_type: 'client_credentials', resource: ORDERS })).body.access_token;
      const delegated = await exchangeAtA({
        requested_token_type: JWT_TYPE, audience: bMeta.issuer, actor_token: actor, actor_token_type: AT,
      });
      assert.equal(delegated.status, 200, JSON.stringify(delegated.body));
      assert.deepEqual(decodeJwt(delegated.body.access_token).act, { sub: 'gateway' });
    });

    await check('two domains: assertions with a wrong aud, expired, untrusted or without sub are invalid_grant', async () => {
      const wrongAud = await exchangeAtA({ requested_token_type: ID_JAG, audience: 'https://as.c.example' });
      assert.equal(wrongAud.status, 200, JSON.stringify(wrongAud.body));
      const cases = {
        'wrong aud': [wrongAud.body.access_token, /aud/],
        expired: [await testIssuer.sign({ sub: 'user-app', aud: bMeta.issuer }, { exp: Math.floor(Date.now() / 1000) - 10 }), /expired/],
        untrusted: [await testIssuer.sign({ sub: 'user-app', aud: bMeta.issuer }, { iss: 'https://untrusted.example' }), /not trusted/],
        'no sub': [await testIssuer.sign({ aud: bMeta.issuer }), /sub/],
        'not a JWT': ['not-a-jwt', /not a JWT/],
      };
      for (const [what, [assertion, description]] of Object.entries(cases)) {
        const res = await atB({ grant_type: JWT_BEARER, assertion });
        expectOAuthError(res, 400, 'invalid_grant');
        assert.match(res.body.error_description, description, what);
      }
      expectOAuthError(await atB({ grant_type: JWT_BEARER }), 400, 'invalid_request');
      // The token endpoint URL names B too.
      const res = await atB({ grant_type: JWT_BEARER, assertion: await testIssuer.sign({ sub: 'carol', aud: bDisco.token_endpoint }) });
      assert.equal(res.status, 200, JSON.stringify(res.body));
      assert.equal(decodeJwt(res.body.access_token).sub, 'carol');
    });

    await check('two domains: malformed ID-JAG requests', async () => {
      expectOAuthError(await exchangeAtA({ requested_token_type: ID_JAG }), 400, 'invalid_request');
      expectOAuthError(await exchangeAtA({ requested_token_type: ID_JAG, audience: [bMeta.issuer, 'https://as.c.example'] }), 400, 'invalid_request');
      expectOAuthError(await exchangeAtA({ requested_token_type: ID_JAG, audience: bMeta.issuer, resource: [API_B, 'https://api.c.example'] }), 400, 'invalid_request');
      expectOAuthError(await exchangeAtA({ requested_token_type: ID_JAG, audience: bMeta.issuer, resource: '/relative' }), 400, 'invalid_target');
    });

    await check('two domains: A issues Transaction Tokens (typ txntoken+jwt, txn, purp, rctx)', async () => {
      const context = { req_ip: '10.0.0.7', authn: 'mfa', req_wl: 'forged' };
      const form = {
        requested_token_type: TXN_TOKEN, audience: 'trust-domain.example', scope: 'orders:read',
        request_context: Buffer.from(JSON.stringify(context)).toString('base64url'),
      };
      const res = await exchangeAtA(form);
      assert.equal(res.status, 200, JSON.stringify(res.body));
      assert.equal(res.body.issued_token_type, TXN_TOKEN);
      assert.equal(res.body.token_type, 'N_A');
      assert.equal(res.body.expires_in, 60);
      const { payload, protectedHeader } = await verifyAt(aDisco, res.body.access_token, { audience: 'trust-domain.example' });
      assert.equal(protectedHeader.typ, 'txntoken+jwt');
      assert.equal(payload.iss, aMeta.issuer);
      assert.equal(payload.aud, 'trust-domain.example');
      assert.equal(payload.sub, 'user-app');
      assert.equal(payload.scope, 'orders:read');
      assert.equal(payload.purp, 'orders:read');
      assert.deepEqual(payload.rctx, { req_ip: '10.0.0.7', authn: 'mfa', req_wl: 'gateway' });
      assert.match(payload.txn, /^[0-9a-f]{32}$/);
      assert.ok(payload.exp - payload.iat <= 60);
      console.log(`       Transaction Token: ${JSON.stringify({ header: protectedHeader, payload })}`);

      const txns = new Set([payload.txn]);
      for (let i = 0; i < 5; i += 1) {
        const again = await exchangeAtA({ requested_token_type: TXN_TOKEN, audience: 'trust-domain.example', scope: 'orders:read' });
        const claims = decodeJwt(again.body.access_token);
        assert.deepEqual(claims.rctx, { req_wl: 'gateway' });
        txns.add(claims.txn);
      }
      assert.equal(txns.size, 6, 'every Transaction Token has its own txn');
    });

    await check('two domains: malformed Transaction Token requests are invalid_request', async () => {
      const base = { requested_token_type: TXN_TOKEN, audience: 'td', scope: 'orders:read' };
      for (const form of [
        { ...base, audience: undefined },
        { ...base, scope: undefined },
        { ...base, request_context: '!!' },
        { ...base, request_context: Buffer.from('{"a":1}').toString('base64') },
        { ...base, request_context: Buffer.from('[1]').toString('base64url') },
        { ...base, request_context: Buffer.from('{nope').toString('base64url') },
      ]) {
        expectOAuthError(await exchangeAtA(form), 400, 'invalid_request');
      }
    });

    await check('two domains: configured subjects get their step-up answer, at A and at B', async () => {
      const stepUp = await atA({ grant_type: TE, subject_token: await userTokenAt('stepup-user'), subject_token_type: AT, audience: ORDERS });
      assert.equal(stepUp.status, 400);
      assert.deepEqual(stepUp.body, {
        error: 'insufficient_user_authentication', error_description: 'a stronger authentication is required', acr_values: 'urn:example:mfa', max_age: 0,
      });
      assert.equal(stepUp.headers.get('cache-control'), 'no-store');

      const entra = await atA({
        grant_type: TE, subject_token: await userTokenAt('entra-user'), subject_token_type: AT, requested_token_type: ID_JAG, audience: bMeta.issuer,
      });
      assert.equal(entra.status, 400);
      assert.deepEqual(entra.body, {
        error: 'interaction_required',
        error_description: 'AADSTS50076: multi-factor authentication is required',
        claims: '{"access_token":{"capolids":{"essential":true,"values":["c1"]}}}',
      });

      const consent = await atA({
        grant_type: TE, subject_token: await userTokenAt('consent-user'), subject_token_type: AT, requested_token_type: TXN_TOKEN, audience: 'td', scope: 's',
      });
      assert.equal(consent.status, 400);
      assert.deepEqual(consent.body, { error: 'consent_required', error_description: 'a stronger authentication is required' });

      const atBStepUp = await atB({ grant_type: JWT_BEARER, assertion: await testIssuer.sign({ sub: 'stepup-user', aud: bMeta.issuer }) });
      assert.equal(atBStepUp.status, 400);
      assert.deepEqual(atBStepUp.body, {
        error: 'insufficient_user_authentication', error_description: 'a stronger authentication is required', acr_values: 'urn:example:mfa', max_age: 300,
      });
    });

    await check('two domains: /__test/stats and /__test/exchanges count the new grants', async () => {
      const stats = (await getJson(`${bMeta.issuer}/__test/stats`)).body;
      assert.ok(stats.issued[JWT_BEARER] >= 4, JSON.stringify(stats));
      assert.ok(stats.requests[JWT_BEARER] > stats.issued[JWT_BEARER], JSON.stringify(stats));
      const aStats = (await getJson(`${aMeta.issuer}/__test/stats`)).body;
      assert.ok(aStats.issued_token_types[ID_JAG] >= 2, JSON.stringify(aStats));
      assert.equal(aStats.issued_token_types[TXN_TOKEN], 6, JSON.stringify(aStats));
      assert.ok(aStats.issued_token_types[JWT_TYPE] >= 1, JSON.stringify(aStats));
      assert.ok(aStats.issued.client_credentials >= 4, JSON.stringify(aStats));

      const records = (await getJson(`${bMeta.issuer}/__test/exchanges`)).body;
      const redeemed = records.find((e) => e.params.grant_type === JWT_BEARER && e.status === 200 && e.issued.aud === API_B);
      assert.ok(redeemed, 'jwt-bearer recorded');
      assert.equal(redeemed.subject.iss, aMeta.issuer);
      assert.equal(redeemed.subject.typ, 'oauth-id-jag+jwt');
      assert.equal(redeemed.params.assertion, idJag);
      const stepUp = records.find((e) => e.error === 'insufficient_user_authentication');
      assert.ok(stepUp && stepUp.status === 400 && stepUp.issued === null);
      const aRecords = (await getJson(`${aMeta.issuer}/__test/exchanges`)).body;
      const txn = aRecords.find((e) => e.issued?.issued_token_type === TXN_TOKEN);
      assert.ok(txn.issued.txn && txn.issued.typ === 'txntoken+jwt');
      for (const stderr of [a.stderr, b.stderr]) {
        assert.ok(!stderr.includes(idJag), 'tokens never reach the log');
        assert.ok(!stderr.includes(userToken), 'tokens never reach the log');
      }
    });
  } finally {
    await stopSts(a);
    if (b) await stopSts(b);
    await testIssuer.close();
    if (failed && !VERBOSE) process.stderr.write(`--- STS A stderr ---\n${a.stderr}\n--- STS B stderr ---\n${b?.stderr}\n---\n`);
  }
}

try {
  await main();
} catch (err) {
  failed += 1;
  console.log(`FAIL - harness: ${err?.stack ?? err}`);
}
console.log(`${passed} passed, ${failed} failed`);
process.exitCode = failed === 0 ? 0 : 1;
