// Shared helpers of the Socket.IO suite: start the real broker binary, mint
// HS256 and RS256 (Cognito) tokens, serve a JWKS, publish over REST, and
// drive socket.io-client while recording everything it receives.
//
// Every wait has a timeout, and everything started here (brokers, JWKS
// servers, sockets) is tracked so a test file can close it all in `after`.

import { spawn } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { io } from 'socket.io-client';

const HERE = path.dirname(fileURLToPath(import.meta.url));

export const BIN =
  process.env.TC_BIN || path.resolve(HERE, '..', '..', 'target', 'debug', 'tensorcost-events');

/** The HS256 secret every broker of this suite is started with. */
export const SECRET = 'socketio-suite-secret-0123456789abcdef-0123456789';

export const COGNITO_ISSUER = 'https://cognito-idp.test.local/pool-1';
export const COGNITO_CLIENT_ID = 'client-1';

const READY_TIMEOUT_MS = 20_000;

// ---------------------------------------------------------------------------
// Small utilities

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Seconds since the Unix epoch. */
export const now = () => Math.floor(Date.now() / 1000);

/** RFC 3339 with milliseconds, as the broker formats `exp`. */
export const isoSeconds = (secs) => new Date(secs * 1000).toISOString();

export const RFC3339_MILLIS = /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/;

/**
 * Polls `predicate` every 10 ms until it returns a truthy value (returned),
 * or fails after `timeoutMs` with `what` and, if given, `state()`.
 */
export async function waitFor(predicate, { timeoutMs = 5000, what = 'condition', state } = {}) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = predicate();
    if (value) return value;
    if (Date.now() >= deadline) {
      const extra = state ? `\nstate: ${describe(state())}` : '';
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}${extra}`);
    }
    await sleep(10);
  }
}

function describe(value) {
  try {
    const text = JSON.stringify(value);
    return text.length > 2000 ? `${text.slice(0, 2000)}…` : text;
  } catch {
    return String(value);
  }
}

/** Rejects after `ms` unless `promise` settles first. */
export function withTimeout(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

// ---------------------------------------------------------------------------
// The broker process

const live = new Set();
process.on('exit', () => {
  for (const child of live) {
    try {
      child.kill('SIGKILL');
    } catch {
      // already gone
    }
  }
});

/**
 * Starts `$TC_BIN serve` on ephemeral loopback ports with a clean
 * environment plus `env`; resolves once the ready file names both ports.
 */
export async function startBroker(env = {}) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tc-js-broker-'));
  const readyFile = path.join(dir, 'ready.json');
  const child = spawn(
    BIN,
    [
      'serve',
      '--grpc-addr',
      '127.0.0.1:0',
      '--http-addr',
      '127.0.0.1:0',
      '--ready-file',
      readyFile,
    ],
    {
      env: {
        PATH: process.env.PATH ?? '/usr/bin:/bin',
        RUST_LOG: 'warn',
        TC_JWT_SECRET: SECRET,
        TC_DATA_DIR: path.join(dir, 'data'),
        ...env,
      },
      stdio: ['ignore', 'pipe', 'pipe'],
    },
  );
  live.add(child);
  let stderr = '';
  child.stderr.setEncoding('utf8');
  child.stderr.on('data', (chunk) => {
    stderr = (stderr + chunk).slice(-20_000);
  });
  child.stdout.resume(); // drain, so the broker never blocks on a full pipe
  let exited = null;
  const exitedPromise = new Promise((resolve) => {
    child.on('exit', (code, signal) => {
      exited = { code, signal };
      live.delete(child);
      resolve();
    });
    child.on('error', (error) => {
      exited = { error: error.message };
      live.delete(child);
      resolve();
    });
  });

  const deadline = Date.now() + READY_TIMEOUT_MS;
  let ready = null;
  while (!ready) {
    if (exited) {
      fs.rmSync(dir, { recursive: true, force: true });
      throw new Error(`broker exited before it was ready (${describe(exited)}); stderr:\n${stderr}`);
    }
    if (Date.now() > deadline) {
      child.kill('SIGKILL');
      fs.rmSync(dir, { recursive: true, force: true });
      throw new Error(`broker not ready after ${READY_TIMEOUT_MS} ms; stderr:\n${stderr}`);
    }
    try {
      ready = JSON.parse(fs.readFileSync(readyFile, 'utf8'));
    } catch {
      await sleep(25);
    }
  }

  return {
    http: `http://${ready.http}`,
    grpc: ready.grpc,
    stderr: () => stderr,
    async stop() {
      if (!exited) {
        child.kill('SIGTERM');
        const gone = await withTimeout(exitedPromise, 3000, 'broker exit').then(
          () => true,
          () => false,
        );
        if (!gone) {
          child.kill('SIGKILL');
          await withTimeout(exitedPromise, 2000, 'broker exit after SIGKILL').catch(() => {});
        }
      }
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}

// ---------------------------------------------------------------------------
// Tokens

export const b64url = (value) =>
  Buffer.from(typeof value === 'string' ? value : JSON.stringify(value)).toString('base64url');

/** A JWT signed with HMAC-SHA256 under `secret`, whatever the header says. */
export function signHmac(claims, secret = SECRET, header = { alg: 'HS256', typ: 'JWT' }) {
  const input = `${b64url(header)}.${b64url(claims)}`;
  const signature = crypto.createHmac('sha256', secret).update(input).digest('base64url');
  return `${input}.${signature}`;
}

/** A backend (HS256) token. */
export function backendToken({
  tenant,
  sub = 'user-1',
  scope = 'events:publish events:subscribe',
  exp = now() + 600,
  secret = SECRET,
  ...extra
} = {}) {
  const claims = { sub, scope, exp, ...extra };
  if (tenant !== undefined) claims.tenantId = tenant;
  return signHmac(claims, secret);
}

/** An RSA key pair with its JWKS entry. */
export function rsaKey(kid) {
  const { publicKey, privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
  return {
    kid,
    publicKey,
    privateKey,
    pem: publicKey.export({ type: 'spki', format: 'pem' }),
    jwk: { ...publicKey.export({ format: 'jwk' }), kid, alg: 'RS256', use: 'sig' },
  };
}

/** A JWT signed RS256 with `key`; `header` overrides the default header. */
export function signRs256(claims, key, header = { alg: 'RS256', typ: 'JWT', kid: key.kid }) {
  const input = `${b64url(header)}.${b64url(claims)}`;
  const signature = crypto.sign('sha256', Buffer.from(input), key.privateKey).toString('base64url');
  return `${input}.${signature}`;
}

/** Claims of a Cognito ID token of the test pool. */
export function idTokenClaims(sub, overrides = {}) {
  return {
    sub,
    iss: COGNITO_ISSUER,
    aud: COGNITO_CLIENT_ID,
    token_use: 'id',
    exp: now() + 600,
    iat: now(),
    ...overrides,
  };
}

/**
 * Serves `{keys}` at /jwks.json on an ephemeral port. `keys` is the live
 * array served: push to it to rotate.
 */
export async function startJwks(initialKeys = []) {
  const keys = [...initialKeys];
  const state = { keys, fetches: 0 };
  const server = http.createServer((req, res) => {
    if (req.url === '/jwks.json') {
      state.fetches += 1;
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ keys }));
    } else {
      res.writeHead(404);
      res.end();
    }
  });
  await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', resolve);
  });
  state.url = `http://127.0.0.1:${server.address().port}/jwks.json`;
  state.close = () =>
    new Promise((resolve) => {
      server.closeAllConnections?.();
      server.close(() => resolve());
    });
  return state;
}

/** Writes a file atomically (write then rename), so a reader never sees half of it. */
export function writeFileAtomic(file, text) {
  const tmp = `${file}.${process.pid}.tmp`;
  fs.writeFileSync(tmp, text);
  fs.renameSync(tmp, file);
}

// ---------------------------------------------------------------------------
// REST publish

/** POSTs a raw JSON body to /v1/events; returns `results`. */
export async function publishRaw(httpUrl, token, body) {
  const res = await fetch(`${httpUrl}/v1/events`, {
    method: 'POST',
    headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' },
    body,
    signal: AbortSignal.timeout(10_000),
  });
  const text = await res.text();
  if (!res.ok) throw new Error(`publish: HTTP ${res.status}: ${text}`);
  return JSON.parse(text).results;
}

/** Publishes `events` ([{type, data, id?}], at most 256); returns [{id, duplicate}]. */
export async function publish(httpUrl, token, events) {
  if (events.length > 256) throw new Error('publish: at most 256 events per call');
  return publishRaw(httpUrl, token, JSON.stringify({ events }));
}

/** GET /metrics as text. */
export async function metricsText(httpUrl) {
  const res = await fetch(`${httpUrl}/metrics`, { signal: AbortSignal.timeout(5000) });
  if (!res.ok) throw new Error(`metrics: HTTP ${res.status}`);
  return res.text();
}

/** The value of one sample in an OpenMetrics text, or null. */
export function metricValue(text, name, labels = '') {
  for (const line of text.split('\n')) {
    const [series, value] = line.trim().split(/\s+/);
    if (series === `${name}${labels}`) return Number(value);
  }
  return null;
}

/** A plain HTTP GET with custom headers (fetch may not send `Origin`). */
export function httpGet(url, headers = {}) {
  return withTimeout(
    new Promise((resolve, reject) => {
      const req = http.get(url, { headers }, (res) => {
        let body = '';
        res.setEncoding('utf8');
        res.on('data', (c) => {
          body += c;
        });
        res.on('end', () => resolve({ status: res.statusCode, headers: res.headers, body }));
      });
      req.on('error', reject);
    }),
    5000,
    `GET ${url}`,
  );
}

// ---------------------------------------------------------------------------
// Socket.IO clients

const sockets = new Set();

/**
 * Opens a socket.io-client socket on /ws and records what it receives:
 * `sessions`, `events`, `reasons` (disconnect_reason), `disconnects`
 * (reasons), `errors` (connect_error messages), `order` (every server
 * event name in arrival order) and `raw` (Socket.IO packet texts).
 */
export function connect(httpUrl, { auth, transport = 'websocket', reconnection = false, extraHeaders, ...rest } = {}) {
  const options = {
    path: '/ws',
    transports: [transport],
    reconnection,
    forceNew: true,
    timeout: 5000,
    ...rest,
  };
  if (auth !== undefined) options.auth = auth;
  if (extraHeaders !== undefined) options.extraHeaders = extraHeaders;
  const socket = io(httpUrl, options);
  sockets.add(socket);
  const c = {
    socket,
    sessions: [],
    events: [],
    reasons: [],
    disconnects: [],
    errors: [],
    errorObjects: [],
    order: [],
    raw: [],
  };
  socket.onAny((name) => c.order.push(name));
  socket.on('session', (s) => c.sessions.push(s));
  socket.on('event', (e) => c.events.push(e));
  socket.on('disconnect_reason', (r) => c.reasons.push(r));
  socket.on('disconnect', (reason) => {
    c.order.push(`disconnect:${reason}`);
    c.disconnects.push(reason);
  });
  socket.on('connect_error', (err) => {
    c.errors.push(err.message);
    c.errorObjects.push(err);
  });
  socket.io.on('open', () => {
    socket.io.engine.on('packet', (p) => {
      if (p.type === 'message' && typeof p.data === 'string') c.raw.push(p.data);
    });
  });
  c.close = () => {
    socket.disconnect();
    sockets.delete(socket);
  };
  /** Events other than `system.*` notices. */
  c.regular = () => c.events.filter((e) => !e.type.startsWith('system.'));
  return c;
}

/** Connects and waits for the `session` message; fails with the refusal if refused. */
export async function connectOk(httpUrl, opts, timeoutMs = 5000) {
  const c = connect(httpUrl, opts);
  try {
    await waitFor(() => c.sessions.length > 0 || c.errors.length > 0, {
      timeoutMs,
      what: 'session',
    });
  } catch (e) {
    c.close();
    throw e;
  }
  if (c.sessions.length === 0) {
    c.close();
    throw new Error(`connection refused: ${c.errors[0]}`);
  }
  return c;
}

/** Connects, expects a refusal, and returns its `connect_error` message. */
export async function connectRefused(httpUrl, opts, timeoutMs = 5000) {
  const c = connect(httpUrl, opts);
  try {
    await waitFor(() => c.errors.length > 0 || c.sessions.length > 0, {
      timeoutMs,
      what: 'connect_error',
    });
    if (c.sessions.length > 0) {
      throw new Error(`expected a refusal, but connected: ${describe(c.sessions[0])}`);
    }
    return c.errors[0];
  } finally {
    c.close();
  }
}

/** Disconnects every socket opened through `connect`. */
export function closeAllSockets() {
  for (const s of sockets) s.disconnect();
  sockets.clear();
}

/** Emits with an acknowledgement, failing after `timeoutMs`. */
export async function emitAck(c, event, payload, timeoutMs = 5000) {
  return c.socket.timeout(timeoutMs).emitWithAck(event, payload);
}

export const ENVELOPE_KEYS = ['data', 'id', 'timestamp', 'trace_id', 'type'];
export const SESSION_KEYS = [
  'rate_limit',
  'recovered',
  'replayed',
  'resumed',
  'socket_id',
  'tenant_id',
  'token_expires_at',
  'types',
];
