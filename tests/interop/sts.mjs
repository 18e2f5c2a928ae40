#!/usr/bin/env node
// A third-party Security Token Service for txgate's interop tests.
//
// It runs oidc-provider (an independent, certified OAuth 2.0 / OpenID Connect server) on
// 127.0.0.1 and adds an RFC 8693 token-exchange grant and an RFC 7523 jwt-bearer grant to it, so
// the gateway is exercised against an implementation whose client authentication, discovery,
// JWKS and JWT access tokens were not written by this project. Token exchange also issues ID-JAGs
// (draft-ietf-oauth-identity-assertion-authz-grant), JWT authorization grants for another
// domain's AS (identity chaining) and Transaction Tokens (draft-ietf-oauth-transaction-tokens);
// jwt-bearer redeems ID-JAGs and JWT grants from this STS or a configured trusted issuer, so two
// processes act as two trust domains. Contract and config format: README.md next to this file.
//
// stdout carries exactly one line: the JSON readiness line. Everything else goes to stderr, so
// console.log/info (which oidc-provider uses for notices) are pointed there before the library
// is loaded; that is also why oidc-provider is imported dynamically below.

import { randomBytes } from 'node:crypto';
import { fstatSync, readFileSync } from 'node:fs';
import { createServer } from 'node:http';
import { parseArgs } from 'node:util';

for (const method of ['log', 'info', 'debug']) {
  console[method] = (...args) => console.error(...args);
}

const {
  calculateJwkThumbprint,
  createLocalJWKSet,
  createRemoteJWKSet,
  decodeJwt,
  decodeProtectedHeader,
  exportJWK,
  generateKeyPair,
  importJWK,
  jwtVerify,
  SignJWT,
} = await import('jose');
const { default: Provider, errors } = await import('oidc-provider');

const GRANT_TOKEN_EXCHANGE = 'urn:ietf:params:oauth:grant-type:token-exchange';
const GRANT_JWT_BEARER = 'urn:ietf:params:oauth:grant-type:jwt-bearer';
const TOKEN_TYPE_ACCESS_TOKEN = 'urn:ietf:params:oauth:token-type:access_token';
const TOKEN_TYPE_JWT = 'urn:ietf:params:oauth:token-type:jwt';
const TOKEN_TYPE_ID_JAG = 'urn:ietf:params:oauth:token-type:id-jag';
const TOKEN_TYPE_TXN_TOKEN = 'urn:ietf:params:oauth:token-type:txn_token';
// JOSE `typ` of an ID-JAG and of a Transaction Token.
const TYP_ID_JAG = 'oauth-id-jag+jwt';
const TYP_TXN_TOKEN = 'txntoken+jwt';
// Token types this STS accepts as subject/actor: both name its JWT access tokens.
const SUPPORTED_TOKEN_TYPES = new Set([TOKEN_TYPE_ACCESS_TOKEN, TOKEN_TYPE_JWT]);
// Token types it issues by token exchange.
const REQUESTABLE_TOKEN_TYPES = new Set([TOKEN_TYPE_ACCESS_TOKEN, TOKEN_TYPE_JWT, TOKEN_TYPE_ID_JAG, TOKEN_TYPE_TXN_TOKEN]);
// The longest an ID-JAG / a Transaction Token may live (seconds), whatever the config says.
const MAX_TTL_ID_JAG = 300;
const MAX_TTL_TXN_TOKEN = 60;
// Algorithms accepted on jwt-bearer assertions from trusted issuers.
const ASSERTION_ALGS = ['RS256', 'PS256', 'ES256', 'EdDSA'];
const SCOPE_TOKEN = /^[\x21\x23-\x5B\x5D-\x7E]+$/;
const STEP_UP_FIELDS = new Set(['error', 'error_description', 'acr_values', 'max_age', 'claims']);
const STEP_UP_DEFAULT_DESCRIPTION = 'a stronger authentication is required';
const DEFAULT_SCOPES = ['orders:read', 'orders:write', 'billing:read', 'inventory:read'];
const SUPPORTED_SIGNING_ALGS = new Set(['RS256', 'ES256']);
// Form parameters never copied into the exchange log: they are client credentials.
const REDACTED_PARAMS = new Set(['client_secret', 'client_assertion']);

function log(...args) {
  process.stderr.write(`[sts] ${args.join(' ')}\n`);
}

function fail(message) {
  log(`fatal: ${message}`);
  process.exit(2);
}

// ---------------------------------------------------------------------------------------------
// Command line and config file

function readOptions() {
  let parsed;
  try {
    parsed = parseArgs({
      options: {
        port: { type: 'string', default: '0' },
        config: { type: 'string' },
      },
      strict: true,
    });
  } catch (err) {
    fail(`${err.message}\nusage: node sts.mjs --port <n|0> --config <file.json>`);
  }
  const port = Number(parsed.values.port);
  if (!Number.isInteger(port) || port < 0 || port > 65535) {
    fail(`--port must be an integer in 0..65535, got ${parsed.values.port}`);
  }
  if (!parsed.values.config) {
    fail('--config <file.json> is required');
  }
  let raw;
  try {
    raw = JSON.parse(readFileSync(parsed.values.config, 'utf8'));
  } catch (err) {
    fail(`cannot read config ${parsed.values.config}: ${err.message}`);
  }
  return { port, config: validateConfig(raw) };
}

function positiveSeconds(value, name, fallback) {
  if (value === undefined) return fallback;
  if (!Number.isInteger(value) || value <= 0) fail(`${name} must be a positive integer (seconds)`);
  return value;
}

function validateConfig(raw) {
  if (raw === null || typeof raw !== 'object') fail('config must be a JSON object');
  const { clients, resources } = raw;
  if (!Array.isArray(clients) || clients.length === 0) fail('config.clients must be a non-empty array');
  if (!Array.isArray(resources) || resources.length === 0) fail('config.resources must be a non-empty array');

  const seen = new Set();
  const outClients = clients.map((c, i) => {
    if (!c || typeof c.client_id !== 'string' || !c.client_id) fail(`clients[${i}].client_id must be a non-empty string`);
    if (seen.has(c.client_id)) fail(`clients[${i}].client_id ${c.client_id} is duplicated`);
    seen.add(c.client_id);
    const method = c.auth_method ?? 'client_secret_basic';
    if (['client_secret_basic', 'client_secret_post', 'client_secret_jwt'].includes(method)) {
      if (typeof c.client_secret !== 'string' || !c.client_secret) fail(`clients[${i}] (${method}) needs client_secret`);
    } else if (method === 'private_key_jwt') {
      if (!c.jwks || !Array.isArray(c.jwks.keys) || c.jwks.keys.length === 0) fail(`clients[${i}] (private_key_jwt) needs jwks.keys`);
    } else {
      fail(`clients[${i}].auth_method ${method} is not supported`);
    }
    return { ...c, auth_method: method };
  });

  for (const [i, r] of resources.entries()) {
    if (typeof r !== 'string' || !URL.canParse(r) || r.includes('#')) {
      fail(`resources[${i}] must be an absolute URI without fragment`);
    }
  }

  const scopes = raw.scopes ?? DEFAULT_SCOPES;
  if (!Array.isArray(scopes) || !scopes.every((s) => typeof s === 'string' && /^[\x21\x23-\x5B\x5D-\x7E]+$/.test(s))) {
    fail('config.scopes must be an array of scope tokens');
  }

  const trustedIssuers = raw.trusted_issuers ?? [];
  if (!Array.isArray(trustedIssuers)) fail('config.trusted_issuers must be an array');
  for (const [i, t] of trustedIssuers.entries()) {
    if (!t || typeof t.issuer !== 'string' || !t.issuer) fail(`trusted_issuers[${i}].issuer must be a non-empty string`);
    if (typeof t.jwks_uri !== 'string' || !URL.canParse(t.jwks_uri)) fail(`trusted_issuers[${i}].jwks_uri must be an absolute URL`);
    const unknown = Object.keys(t).filter((k) => !['issuer', 'jwks_uri'].includes(k));
    if (unknown.length) fail(`trusted_issuers[${i}] has unknown keys: ${unknown.join(', ')}`);
  }

  const stepUp = raw.step_up ?? {};
  if (stepUp === null || typeof stepUp !== 'object' || Array.isArray(stepUp)) fail('config.step_up must be an object keyed by subject');
  for (const [sub, answer] of Object.entries(stepUp)) {
    const where = `step_up[${JSON.stringify(sub)}]`;
    if (answer === null || typeof answer !== 'object' || Array.isArray(answer)) fail(`${where} must be an object`);
    const unknown = Object.keys(answer).filter((k) => !STEP_UP_FIELDS.has(k));
    if (unknown.length) fail(`${where} has unknown keys: ${unknown.join(', ')}`);
    if (typeof answer.error !== 'string' || !answer.error) fail(`${where}.error must be a non-empty string`);
    for (const key of ['error_description', 'acr_values', 'claims']) {
      if (answer[key] !== undefined && typeof answer[key] !== 'string') fail(`${where}.${key} must be a string`);
    }
    if (answer.max_age !== undefined && (!Number.isInteger(answer.max_age) || answer.max_age < 0)) fail(`${where}.max_age must be a non-negative integer`);
  }

  const signingAlg = raw.signing_alg ?? 'RS256';
  if (!SUPPORTED_SIGNING_ALGS.has(signingAlg)) fail(`config.signing_alg must be one of ${[...SUPPORTED_SIGNING_ALGS].join(', ')}`);

  const ttl = raw.ttl ?? {};
  const idJagTtl = positiveSeconds(ttl.id_jag, 'ttl.id_jag', MAX_TTL_ID_JAG);
  if (idJagTtl > MAX_TTL_ID_JAG) fail(`ttl.id_jag must be at most ${MAX_TTL_ID_JAG}`);
  const txnTokenTtl = positiveSeconds(ttl.txn_token, 'ttl.txn_token', MAX_TTL_TXN_TOKEN);
  if (txnTokenTtl > MAX_TTL_TXN_TOKEN) fail(`ttl.txn_token must be at most ${MAX_TTL_TXN_TOKEN}`);
  return {
    clients: outClients,
    resources: [...new Set(resources)],
    scopes,
    signingAlg,
    trustedIssuers: trustedIssuers.map((t) => ({ issuer: t.issuer, jwksUri: t.jwks_uri })),
    stepUp: new Map(Object.entries(stepUp)),
    ttl: {
      clientCredentials: positiveSeconds(ttl.client_credentials, 'ttl.client_credentials', 600),
      tokenExchange: positiveSeconds(ttl.token_exchange, 'ttl.token_exchange', 300),
      jwtBearer: positiveSeconds(ttl.jwt_bearer, 'ttl.jwt_bearer', 300),
      idJag: idJagTtl,
      jwtGrant: positiveSeconds(ttl.jwt_grant, 'ttl.jwt_grant', 300),
      txnToken: txnTokenTtl,
    },
  };
}

// ---------------------------------------------------------------------------------------------
// Signing keys. oidc-provider reads its keystore once, at construction, so rotation builds a new
// Provider over the new key set (see buildProvider). Keys are kept newest first.

async function newSigningKey(alg) {
  const { privateKey } = await generateKeyPair(alg, { extractable: true });
  const jwk = await exportJWK(privateKey);
  jwk.kid = await calculateJwkThumbprint(jwk);
  jwk.alg = alg;
  jwk.use = 'sig';
  return jwk;
}

function publicPart(jwk) {
  const {
    d, p, q, dp, dq, qi, oth, ...pub
  } = jwk;
  return pub;
}

// ---------------------------------------------------------------------------------------------
// State shared by every Provider instance built during the run.

const { port: requestedPort, config } = readOptions();
const resourceSet = new Set(config.resources);
const scopeSet = new Set(config.scopes);
// jose fetches each trusted issuer's JWKS on first use and again when a kid is unknown.
const trustedKeys = new Map(config.trustedIssuers.map((t) => [t.issuer, createRemoteJWKSet(new URL(t.jwksUri), { timeoutDuration: 5000 })]));

const state = {
  issuer: undefined,
  keys: [], // private JWKs, newest (current) first
  verifyKeys: undefined, // jose key set over the public halves of `keys`
  handle: undefined, // the current provider's request listener
  exchanges: [],
  seq: 0,
  // Token-endpoint requests and issued tokens, per grant_type, since start (GET /__test/stats).
  stats: { requests: {}, issued: {}, issued_token_types: {} },
  signingKeys: new Map(), // kid -> imported private key, for the JWTs signed here with jose
};

function currentKid() {
  return state.keys[0].kid;
}

function resourceServerInfo(identifier, kid) {
  return {
    scope: config.scopes.join(' '),
    audience: identifier,
    accessTokenFormat: 'jwt',
    accessTokenTTL: config.ttl.clientCredentials,
    // Pinning the kid makes "new tokens use the newest key" explicit instead of relying on the
    // keystore's ordering.
    jwt: { sign: { alg: config.signingAlg, kid } },
  };
}

function clientMetadata(c) {
  const metadata = {
    client_id: c.client_id,
    token_endpoint_auth_method: c.auth_method,
    grant_types: ['client_credentials', GRANT_TOKEN_EXCHANGE, GRANT_JWT_BEARER],
    response_types: [],
    redirect_uris: [],
    id_token_signed_response_alg: config.signingAlg,
  };
  if (c.client_secret !== undefined) metadata.client_secret = c.client_secret;
  if (c.jwks !== undefined) metadata.jwks = c.jwks;
  return metadata;
}

// `kid` is the signing key of the provider being built; a request still running on a provider
// replaced by rotation keeps signing with the key that provider has.
function providerConfiguration(kid) {
  return {
    clients: config.clients.map(clientMetadata),
    jwks: { keys: state.keys.map((k) => ({ ...k })) },
    // Cookies are unused here (no browser flows) but oidc-provider wants signing keys for them;
    // fresh random ones each run so nothing secret lives in the repository.
    cookies: { keys: [randomBytes(32).toString('base64url'), randomBytes(32).toString('base64url')] },
    scopes: ['openid', ...config.scopes],
    clientDefaults: { id_token_signed_response_alg: config.signingAlg },
    features: {
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      introspection: {
        enabled: true,
        // Any authenticated client may introspect; this is a test peer, not a policy engine.
        allowedPolicy: async () => true,
      },
      resourceIndicators: {
        enabled: true,
        // client_credentials only understands `resource`; `audience` (the RFC 8693 spelling
        // some clients also use here) is honoured as the default resource when `resource` is
        // absent.
        async defaultResource(ctx, _client, oneOf) {
          if (oneOf) return oneOf;
          const audience = ctx.oidc.body?.audience;
          if (ctx.oidc.route === 'token' && ctx.oidc.body?.grant_type === 'client_credentials' && audience) {
            return audience;
          }
          return undefined;
        },
        useGrantedResource: async () => false,
        async getResourceServerInfo(_ctx, identifier) {
          if (!resourceSet.has(identifier)) throw new errors.InvalidTarget();
          return resourceServerInfo(identifier, kid);
        },
      },
    },
    // Token-exchange tokens carry their `act` claim in `extra`; keep it rather than replacing it.
    extraTokenClaims: async (_ctx, token) => (token.kind === 'AccessToken' ? token.extra : undefined),
    ttl: {
      AccessToken: (_ctx, token) => token.expiresIn ?? config.ttl.tokenExchange,
      ClientCredentials: () => config.ttl.clientCredentials,
    },
  };
}

// ---------------------------------------------------------------------------------------------
// RFC 8693 token exchange

function invalidGrant(description) {
  return new errors.CustomOIDCProviderError('invalid_grant', description);
}

function asList(value) {
  if (value === undefined) return [];
  return Array.isArray(value) ? value : [value];
}

// Subject and actor tokens are only accepted when this STS issued them: signed by one of its
// keys (current or rotated-out), `iss` equal to its issuer, and not expired. An ID-JAG or a
// Transaction Token is a grant or a call-chain context, not a token to exchange.
async function verifyOwnToken(token, name) {
  let typ;
  try {
    typ = decodeProtectedHeader(token).typ;
  } catch {
    typ = undefined;
  }
  if (typeof typ === 'string' && [TYP_ID_JAG, TYP_TXN_TOKEN].includes(typ.toLowerCase().replace(/^application\//, ''))) {
    throw invalidGrant(`${name} rejected: a ${typ} is not exchangeable`);
  }
  try {
    const { payload, protectedHeader } = await jwtVerify(token, state.verifyKeys, {
      issuer: state.issuer,
      algorithms: [...SUPPORTED_SIGNING_ALGS],
      requiredClaims: ['exp'],
    });
    return { payload, kid: protectedHeader.kid };
  } catch (err) {
    const reason = {
      ERR_JWT_EXPIRED: 'it has expired',
      ERR_JWS_SIGNATURE_VERIFICATION_FAILED: 'its signature does not verify',
      ERR_JWKS_NO_MATCHING_KEY: 'it is not signed by a key of this issuer',
    }[err.code] ?? err.message;
    throw invalidGrant(`${name} rejected: ${reason}`);
  }
}

function principal(payload) {
  return payload.sub ?? payload.client_id;
}

async function tokenExchangeHandler(kid, ctx) {
  const { params, client, provider } = ctx.oidc;
  const note = {
    client_id: client.clientId,
    client_auth_method: client.clientAuthMethod,
  };
  ctx.state.exchange = note;

  for (const name of ['subject_token', 'subject_token_type']) {
    if (!params[name]) throw new errors.InvalidRequest(`missing required parameter '${name}'`);
  }
  if (!SUPPORTED_TOKEN_TYPES.has(params.subject_token_type)) {
    throw new errors.InvalidRequest(`unsupported subject_token_type ${params.subject_token_type}`);
  }
  if (!!params.actor_token !== !!params.actor_token_type) {
    throw new errors.InvalidRequest('actor_token and actor_token_type must be provided together');
  }
  if (params.actor_token_type && !SUPPORTED_TOKEN_TYPES.has(params.actor_token_type)) {
    throw new errors.InvalidRequest(`unsupported actor_token_type ${params.actor_token_type}`);
  }
  const issuedTokenType = params.requested_token_type || TOKEN_TYPE_ACCESS_TOKEN;
  if (!REQUESTABLE_TOKEN_TYPES.has(issuedTokenType)) {
    throw new errors.InvalidRequest(`unsupported requested_token_type ${issuedTokenType}`);
  }
  // ID-JAGs, Transaction Tokens and JWT grants naming an `audience` are signed here rather
  // than by oidc-provider; their request shape is checked before any token is verified.
  const grantRequest = grantTokenRequest(params, issuedTokenType);

  const subject = await verifyOwnToken(params.subject_token, 'subject_token');
  note.subject = { sub: subject.payload.sub, client_id: subject.payload.client_id, aud: subject.payload.aud, kid: subject.kid };
  const subjectPrincipal = principal(subject.payload);
  if (!subjectPrincipal) throw invalidGrant('subject_token has neither sub nor client_id');

  let act;
  if (params.actor_token) {
    const actor = await verifyOwnToken(params.actor_token, 'actor_token');
    note.actor = { sub: actor.payload.sub, client_id: actor.payload.client_id, aud: actor.payload.aud, act: actor.payload.act, kid: actor.kid };
    const actorPrincipal = principal(actor.payload);
    if (!actorPrincipal) throw invalidGrant('actor_token has neither sub nor client_id');
    act = { sub: actorPrincipal };
    if (actor.payload.act) act.act = actor.payload.act;
  }

  if (answerStepUp(ctx, subjectPrincipal)) return;

  if (grantRequest) {
    // A JWT grant keeps the delegation chain, as the access tokens do.
    if (act && grantRequest.tokenType === TOKEN_TYPE_JWT) grantRequest.act = act;
    await issueGrantToken(ctx, kid, grantRequest, subjectPrincipal, client.clientId);
    return;
  }

  // `audience` and `resource` both name the target; unknown values are ignored as long as one
  // known resource remains. oidc-provider's access tokens carry a single audience.
  const requested = [...new Set([...asList(params.audience), ...asList(params.resource)])];
  const targets = requested.filter((t) => resourceSet.has(t));
  note.ignored_targets = requested.filter((t) => !resourceSet.has(t));
  if (targets.length === 0) {
    throw new errors.InvalidTarget(requested.length ? 'none of the requested audience/resource values is known' : 'audience or resource is required');
  }
  if (targets.length > 1) throw new errors.InvalidTarget('only a single audience/resource value is supported');
  const [target] = targets;

  let scope;
  if (params.scope) {
    const requestedScopes = params.scope.split(' ').filter(Boolean);
    const unknown = requestedScopes.filter((s) => !scopeSet.has(s));
    if (unknown.length) throw new errors.InvalidScope(`requested scope is not allowed: ${unknown.join(' ')}`, unknown.join(' '));
    scope = [...new Set(requestedScopes)].join(' ');
  } else if (typeof subject.payload.scope === 'string') {
    // Without a requested scope the subject's own (known) scopes carry over.
    scope = subject.payload.scope.split(' ').filter((s) => scopeSet.has(s)).join(' ');
  }

  const token = new provider.AccessToken({
    accountId: subjectPrincipal,
    client,
    gty: GRANT_TOKEN_EXCHANGE,
    scope: scope || undefined,
    expiresIn: config.ttl.tokenExchange,
    extra: act ? { act } : undefined,
    resourceServer: new provider.ResourceServer(target, resourceServerInfo(target, kid)),
  });
  ctx.oidc.entity('AccessToken', token);
  const value = await token.save();

  const claims = decodeJwt(value);
  note.issued = {
    sub: claims.sub,
    aud: claims.aud,
    act: claims.act,
    scope: claims.scope,
    client_id: claims.client_id,
    jti: claims.jti,
    exp: claims.exp,
    kid: decodeProtectedHeader(value).kid,
    issued_token_type: issuedTokenType,
  };

  ctx.body = {
    access_token: value,
    issued_token_type: issuedTokenType,
    token_type: token.tokenType,
    expires_in: token.expiration,
    ...(token.scope ? { scope: token.scope } : undefined),
  };
}

// The one `audience` of an ID-JAG, a Transaction Token or a JWT grant.
function singleAudience(params, what) {
  const audiences = asList(params.audience);
  if (audiences.length === 0) throw new errors.InvalidRequest(`audience is required for ${what}`);
  if (audiences.length > 1) throw new errors.InvalidRequest(`${what} has exactly one audience`);
  return audiences[0];
}

function checkScopeSyntax(scope) {
  if (scope !== undefined && !scope.split(' ').every((s) => SCOPE_TOKEN.test(s))) {
    throw new errors.InvalidScope('scope must be space-separated RFC 6749 scope tokens', scope);
  }
}

// `request_context`: the unpadded base64url of a JSON object (draft-ietf-oauth-transaction-tokens).
function decodeRequestContext(encoded) {
  const malformed = () => new errors.InvalidRequest('request_context is not the base64url of a JSON object');
  if (!/^[A-Za-z0-9_-]+$/.test(encoded) || encoded.length % 4 === 1) throw malformed();
  let context;
  try {
    context = JSON.parse(Buffer.from(encoded, 'base64url').toString('utf8'));
  } catch {
    throw malformed();
  }
  if (context === null || typeof context !== 'object' || Array.isArray(context)) throw malformed();
  return context;
}

// What a token exchange asks for when it is not an oidc-provider access token: an ID-JAG, a
// Transaction Token, or a JWT authorization grant (requested_token_type jwt with an `audience`).
// Returns undefined for everything oidc-provider issues itself.
function grantTokenRequest(params, issuedTokenType) {
  const resources = asList(params.resource);
  switch (issuedTokenType) {
    case TOKEN_TYPE_ID_JAG: {
      const audience = singleAudience(params, 'an ID-JAG');
      if (resources.length > 1) throw new errors.InvalidRequest('an ID-JAG names at most one resource');
      if (resources.length === 1 && (!URL.canParse(resources[0]) || resources[0].includes('#'))) {
        throw new errors.InvalidTarget('resource must be an absolute URI without a fragment');
      }
      checkScopeSyntax(params.scope);
      return {
        tokenType: issuedTokenType, typ: TYP_ID_JAG, ttl: config.ttl.idJag, audience, resource: resources[0], scope: params.scope,
      };
    }
    case TOKEN_TYPE_TXN_TOKEN: {
      const audience = singleAudience(params, 'a Transaction Token');
      if (!params.scope) throw new errors.InvalidRequest('scope (the purpose) is required for a Transaction Token');
      checkScopeSyntax(params.scope);
      const context = params.request_context === undefined ? {} : decodeRequestContext(params.request_context);
      return {
        tokenType: issuedTokenType, typ: TYP_TXN_TOKEN, ttl: config.ttl.txnToken, audience, scope: params.scope, context,
      };
    }
    case TOKEN_TYPE_JWT: {
      // Without `audience` this stays the resource-bound access token it always was.
      if (params.audience === undefined) return undefined;
      const audience = singleAudience(params, 'a JWT authorization grant');
      checkScopeSyntax(params.scope);
      return {
        tokenType: issuedTokenType, typ: 'JWT', ttl: config.ttl.jwtGrant, audience, scope: params.scope,
      };
    }
    default:
      return undefined;
  }
}

// The private key `kid` as a jose key, imported once.
async function signingKey(kid) {
  let key = state.signingKeys.get(kid);
  if (!key) {
    const jwk = state.keys.find((k) => k.kid === kid);
    key = await importJWK(jwk, config.signingAlg);
    state.signingKeys.set(kid, key);
  }
  return key;
}

async function issueGrantToken(ctx, kid, request, sub, clientId) {
  const now = Math.floor(Date.now() / 1000);
  let claims;
  if (request.tokenType === TOKEN_TYPE_TXN_TOKEN) {
    claims = {
      iss: state.issuer,
      iat: now,
      exp: now + request.ttl,
      aud: request.audience,
      txn: randomBytes(16).toString('hex'),
      sub,
      scope: request.scope,
      purp: request.scope,
      // The requesting workload is named by the STS, never by the request.
      rctx: { ...request.context, req_wl: clientId },
    };
  } else {
    claims = {
      iss: state.issuer,
      sub,
      aud: request.audience,
      client_id: clientId,
      jti: randomBytes(16).toString('hex'),
      iat: now,
      exp: now + request.ttl,
      ...(request.resource !== undefined ? { resource: request.resource } : undefined),
      ...(request.scope !== undefined ? { scope: request.scope } : undefined),
      ...(request.act !== undefined ? { act: request.act } : undefined),
    };
  }
  const value = await new SignJWT(claims)
    .setProtectedHeader({ alg: config.signingAlg, kid, typ: request.typ })
    .sign(await signingKey(kid));
  ctx.state.exchange.issued = {
    sub,
    aud: request.audience,
    scope: request.scope,
    client_id: clientId,
    act: request.act,
    ...(claims.jti ? { jti: claims.jti } : { txn: claims.txn }),
    exp: claims.exp,
    kid,
    typ: request.typ,
    issued_token_type: request.tokenType,
  };
  ctx.body = {
    access_token: value,
    issued_token_type: request.tokenType,
    // RFC 8693 §2.2.1: none of these is an access token.
    token_type: 'N_A',
    expires_in: request.ttl,
    ...(request.scope ? { scope: request.scope } : undefined),
  };
}

// RFC 9470: a configured subject gets its configured error instead of a token. Returns true
// when it answered.
function answerStepUp(ctx, sub) {
  const answer = config.stepUp.get(sub);
  if (!answer) return false;
  ctx.status = 400;
  ctx.set('cache-control', 'no-store');
  ctx.body = {
    error: answer.error,
    error_description: answer.error_description ?? STEP_UP_DEFAULT_DESCRIPTION,
    ...(answer.acr_values !== undefined ? { acr_values: answer.acr_values } : undefined),
    ...(answer.max_age !== undefined ? { max_age: answer.max_age } : undefined),
    ...(answer.claims !== undefined ? { claims: answer.claims } : undefined),
  };
  log(`step-up for sub=${sub}: ${answer.error}`);
  return true;
}

// RFC 7523 §3: signed by this STS or a trusted issuer, unexpired, with `sub`, and an `aud` that
// names this STS (its issuer or its token endpoint).
async function verifyAssertion(assertion, tokenEndpoint) {
  let header;
  let unverified;
  try {
    header = decodeProtectedHeader(assertion);
    unverified = decodeJwt(assertion);
  } catch {
    throw invalidGrant('assertion rejected: it is not a JWT');
  }
  const keys = unverified.iss === state.issuer ? state.verifyKeys : trustedKeys.get(unverified.iss);
  if (!keys) throw invalidGrant(`assertion rejected: issuer ${JSON.stringify(unverified.iss ?? null)} is not trusted`);
  try {
    const { payload } = await jwtVerify(assertion, keys, {
      issuer: unverified.iss,
      audience: [state.issuer, tokenEndpoint],
      algorithms: ASSERTION_ALGS,
      requiredClaims: ['exp', 'sub'],
    });
    if (typeof payload.sub !== 'string' || !payload.sub) throw invalidGrant('assertion rejected: it has no sub');
    return { payload, typ: header.typ };
  } catch (err) {
    if (err instanceof errors.OIDCProviderError) throw err;
    const reason = {
      ERR_JWT_EXPIRED: 'it has expired',
      ERR_JWS_SIGNATURE_VERIFICATION_FAILED: 'its signature does not verify',
      ERR_JWKS_NO_MATCHING_KEY: 'it is not signed by a key of its issuer',
      ERR_JWKS_TIMEOUT: 'its issuer\'s JWKS could not be fetched in time',
    }[err.code] ?? (err.claim === 'aud' ? 'its aud does not name this STS' : err.message);
    throw invalidGrant(`assertion rejected: ${reason}`);
  }
}

function isIdJag(typ) {
  return typeof typ === 'string' && typ.toLowerCase().replace(/^application\//, '') === TYP_ID_JAG;
}

// RFC 7523 §2.1 with an ID-JAG or a JWT authorization grant: a JWT access token of this STS.
async function jwtBearerHandler(kid, ctx) {
  const { params, client, provider } = ctx.oidc;
  const note = {
    client_id: client.clientId,
    client_auth_method: client.clientAuthMethod,
  };
  ctx.state.exchange = note;

  if (!params.assertion) throw new errors.InvalidRequest("missing required parameter 'assertion'");
  // `requested_token_use` (Entra's on-behalf-of) is accepted and ignored.
  checkScopeSyntax(params.scope);
  const targets = [...new Set([...asList(params.resource), ...asList(params.audience)])];
  if (targets.length > 1) throw new errors.InvalidTarget('only a single audience/resource value is supported');

  const { payload, typ } = await verifyAssertion(params.assertion, ctx.oidc.urlFor('token'));
  const idJag = isIdJag(typ);
  note.subject = {
    iss: payload.iss, sub: payload.sub, aud: payload.aud, client_id: payload.client_id, typ: typ ?? null,
  };
  if (answerStepUp(ctx, payload.sub)) return;

  let audience;
  let scope;
  if (idJag) {
    // draft-ietf-oauth-identity-assertion-authz-grant: bound to the client it was issued to.
    if (payload.client_id !== client.clientId) throw invalidGrant('the ID-JAG was issued to another client');
    if (payload.scope !== undefined && typeof payload.scope !== 'string') throw invalidGrant('the ID-JAG\'s scope is not a string');
    scope = payload.scope;
    if (params.scope) {
      const granted = new Set((scope ?? '').split(' ').filter(Boolean));
      const exceeding = params.scope.split(' ').filter((s) => !granted.has(s));
      if (exceeding.length) throw new errors.InvalidScope('the requested scope exceeds the ID-JAG\'s scope', exceeding.join(' '));
    }
    audience = typeof payload.resource === 'string' && payload.resource ? payload.resource : targets[0] ?? client.clientId;
  } else {
    scope = params.scope;
    audience = targets[0] ?? client.clientId;
  }

  const token = new provider.AccessToken({
    accountId: payload.sub,
    client,
    gty: GRANT_JWT_BEARER,
    scope: scope || undefined,
    expiresIn: config.ttl.jwtBearer,
    resourceServer: new provider.ResourceServer(audience, { ...resourceServerInfo(audience, kid), scope: scope ?? '' }),
  });
  ctx.oidc.entity('AccessToken', token);
  const value = await token.save();
  const claims = decodeJwt(value);
  note.issued = {
    sub: claims.sub,
    aud: claims.aud,
    scope: claims.scope,
    client_id: claims.client_id,
    jti: claims.jti,
    exp: claims.exp,
    kid: decodeProtectedHeader(value).kid,
    issued_token_type: TOKEN_TYPE_ACCESS_TOKEN,
  };
  ctx.body = {
    access_token: value,
    issued_token_type: TOKEN_TYPE_ACCESS_TOKEN,
    token_type: token.tokenType,
    expires_in: token.expiration,
    ...(token.scope ? { scope: token.scope } : undefined),
  };
}

// How the caller actually authenticated. oidc-provider accepts client_secret_basic and
// client_secret_post interchangeably for a client registered with either, so the registered
// method alone does not tell whether the gateway used the Authorization header.
function presentedAuth(ctx, body) {
  if (/^basic /i.test(ctx.get('authorization'))) return 'client_secret_basic';
  if (body.client_secret !== undefined) return 'client_secret_post';
  if (body.client_assertion !== undefined) return 'client_assertion';
  return 'none';
}

function bump(counts, key) {
  counts[key] = (counts[key] ?? 0) + 1;
}

// Wraps every request to the provider; counts token-endpoint requests per grant and records
// token-exchange and jwt-bearer requests after the provider has produced its response (success
// or error), so the log reflects exactly what the caller saw.
async function recordExchanges(ctx, next) {
  await next();
  const oidc = ctx.oidc;
  if (!oidc || oidc.route !== 'token') return;
  const grant = oidc.body?.grant_type ?? 'none';
  bump(state.stats.requests, grant);
  if (ctx.status === 200) {
    bump(state.stats.issued, grant);
    const issuedType = ctx.body?.issued_token_type ?? TOKEN_TYPE_ACCESS_TOKEN;
    bump(state.stats.issued_token_types, issuedType);
  }
  if (grant !== GRANT_TOKEN_EXCHANGE && grant !== GRANT_JWT_BEARER) return;

  const params = {};
  for (const [key, value] of Object.entries(oidc.body)) {
    if (!REDACTED_PARAMS.has(key)) params[key] = value;
  }
  // The handler only runs once client authentication succeeded; before that, no client counts
  // as authenticated.
  const note = ctx.state.exchange ?? {};
  const error = ctx.status >= 400 ? ctx.body?.error ?? 'unknown' : null;
  const entry = {
    seq: ++state.seq,
    time: new Date().toISOString(),
    status: ctx.status,
    error,
    error_description: error ? ctx.body?.error_description ?? null : null,
    client_id: note.client_id ?? null,
    client_auth_method: note.client_auth_method ?? null,
    presented_auth: presentedAuth(ctx, oidc.body),
    params,
    subject: note.subject ?? null,
    actor: note.actor ?? null,
    ignored_targets: note.ignored_targets ?? [],
    issued: error ? null : note.issued ?? null,
  };
  state.exchanges.push(entry);
  log(`exchange #${entry.seq} grant=${grant} client=${entry.client_id} status=${entry.status}${error ? ` error=${error}` : ` sub=${entry.issued?.sub} aud=${entry.issued?.aud} type=${entry.issued?.issued_token_type}${entry.issued?.act ? ` act=${JSON.stringify(entry.issued.act)}` : ''}`}`);
}

function buildProvider() {
  const kid = currentKid();
  const provider = new Provider(state.issuer, providerConfiguration(kid));
  provider.registerGrantType(
    GRANT_TOKEN_EXCHANGE,
    (ctx) => tokenExchangeHandler(kid, ctx),
    ['subject_token', 'subject_token_type', 'actor_token', 'actor_token_type', 'requested_token_type', 'audience', 'resource', 'scope', 'request_context'],
    ['audience', 'resource'],
  );
  provider.registerGrantType(
    GRANT_JWT_BEARER,
    (ctx) => jwtBearerHandler(kid, ctx),
    ['assertion', 'scope', 'audience', 'resource', 'requested_token_use'],
    ['audience', 'resource'],
  );
  provider.use(recordExchanges);
  provider.on('server_error', (_ctx, err) => log(`server_error: ${err.stack ?? err}`));
  provider.on('grant.error', (_ctx, err) => log(`grant.error: ${err.error ?? err.message}${err.error_description ? ` (${err.error_description})` : ''}${err.error_detail ? ` [${err.error_detail}]` : ''}`));
  state.handle = provider.callback();
  state.verifyKeys = createLocalJWKSet({ keys: state.keys.map(publicPart) });
}

async function rotate() {
  state.keys.unshift(await newSigningKey(config.signingAlg));
  buildProvider();
  log(`rotated signing key; current kid ${currentKid()}, ${state.keys.length} key(s) published`);
  return currentKid();
}

// ---------------------------------------------------------------------------------------------
// HTTP: test-only admin routes under /__test/, everything else goes to the current provider.

function sendJson(res, status, body) {
  const text = JSON.stringify(body);
  res.writeHead(status, { 'content-type': 'application/json', 'cache-control': 'no-store' });
  res.end(text);
}

async function admin(req, res, path) {
  if (path === '/__test/rotate' && req.method === 'POST') {
    req.resume();
    return sendJson(res, 200, { kid: await rotate() });
  }
  if (path === '/__test/exchanges' && req.method === 'GET') {
    return sendJson(res, 200, state.exchanges);
  }
  if (path === '/__test/exchanges' && req.method === 'DELETE') {
    const cleared = state.exchanges.length;
    state.exchanges = [];
    return sendJson(res, 200, { cleared });
  }
  if (path === '/__test/stats' && req.method === 'GET') {
    return sendJson(res, 200, state.stats);
  }
  if (path === '/__test/kids' && req.method === 'GET') {
    return sendJson(res, 200, { current: currentKid(), all: state.keys.map((k) => k.kid) });
  }
  return sendJson(res, 404, { error: 'not_found' });
}

const server = createServer((req, res) => {
  const started = Date.now();
  res.on('finish', () => log(`${req.method} ${req.url} -> ${res.statusCode} (${Date.now() - started} ms)`));
  const path = new URL(req.url, 'http://127.0.0.1').pathname;
  if (path.startsWith('/__test/')) {
    admin(req, res, path).catch((err) => {
      log(`admin error: ${err.stack ?? err}`);
      if (!res.headersSent) sendJson(res, 500, { error: 'server_error' });
    });
    return;
  }
  state.handle(req, res);
});

function shutdown(reason) {
  log(`exiting: ${reason}`);
  server.closeAllConnections();
  server.close();
  process.exit(0);
}

for (const signal of ['SIGTERM', 'SIGINT', 'SIGHUP']) {
  process.on(signal, () => shutdown(signal));
}

// The parent holds our stdin open; when it goes away (even by SIGKILL) stdin reaches EOF and
// this process follows. Only pipes and sockets are watched: /dev/null or a terminal on stdin
// says nothing about the parent's lifetime.
{
  let watch = false;
  try {
    const st = fstatSync(0);
    watch = st.isFIFO() || st.isSocket();
  } catch {
    watch = false;
  }
  if (watch) {
    process.stdin.on('end', () => shutdown('stdin closed'));
    process.stdin.on('error', () => shutdown('stdin error'));
    process.stdin.resume();
  } else {
    log('stdin is not a pipe; the process will not follow its parent, stop it with SIGTERM');
  }
}

state.keys.push(await newSigningKey(config.signingAlg));

server.on('error', (err) => fail(`listen: ${err.message}`));
server.listen(requestedPort, '127.0.0.1', () => {
  const { port } = server.address();
  state.issuer = `http://127.0.0.1:${port}`;
  buildProvider();
  log(`oidc-provider listening at ${state.issuer}; trusted issuers ${config.trustedIssuers.map((t) => t.issuer).join(', ') || 'none'}; step-up subjects ${[...config.stepUp.keys()].join(', ') || 'none'}; clients ${config.clients.map((c) => `${c.client_id}(${c.auth_method})`).join(', ')}; resources ${config.resources.join(', ')}; signing ${config.signingAlg} kid ${currentKid()}`);
  process.stdout.write(`${JSON.stringify({ issuer: state.issuer, port })}\n`);
});
