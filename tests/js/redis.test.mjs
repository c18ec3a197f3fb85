// With Redis configured: Cognito memberships (hash `tc:memberships`) and
// Socket.IO per-tenant rate limits (hash `tc:ratelimits`) live in Redis,
// are picked up without a restart, and a Redis outage refuses only what
// needs Redis (in-process delivery goes on).
//
// Starts its own redis-server on a free loopback port; fails (never skips)
// when redis-server is not installed.

import assert from 'node:assert/strict';
import { execFile, spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';

import {
  COGNITO_CLIENT_ID,
  COGNITO_ISSUER,
  backendToken,
  closeAllSockets,
  connectOk,
  connectRefused,
  idTokenClaims,
  publish,
  rsaKey,
  signRs256,
  sleep,
  startBroker,
  startJwks,
  waitFor,
  withTimeout,
} from './harness.mjs';

const missingMessage = (absent) =>
  `${absent.join(' and ')} ${absent.length > 1 ? 'are' : 'is'} missing (not on PATH): the Redis tests need redis-server and redis-cli; ` +
  'scripts/test installs them (apt-get install redis-server)';

let missing = null; // set when redis-server / redis-cli cannot be run
let redis; // { port, child, exited, kill() }
let broker;
let jwks;
let dir;
const key = rsaKey('key-redis');

const idToken = (sub, overrides = {}) => signRs256(idTokenClaims(sub, overrides), key);

/** Fails the calling test when redis-server is not installed. */
function requireRedis() {
  if (missing) assert.fail(missing);
  assert.ok(redis && broker, 'set-up did not complete (see the before hook)');
}

// ---------------------------------------------------------------------------
// redis-server

function installed(cmd) {
  const r = spawnSync(cmd, ['--version'], { encoding: 'utf8', timeout: 5000 });
  return !r.error && r.status === 0;
}

function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

/** Runs `redis-cli -p PORT ...args`; resolves to its trimmed stdout. */
function redisCli(port, ...args) {
  return new Promise((resolve, reject) => {
    execFile('redis-cli', ['-p', String(port), ...args], { timeout: 3000 }, (error, stdout, stderr) => {
      if (error) reject(new Error(`redis-cli ${args.join(' ')}: ${error.message} ${stderr}`));
      else resolve(stdout.trim());
    });
  });
}

async function startRedis(tmp) {
  let lastError = '';
  for (let attempt = 0; attempt < 3; attempt++) {
    const port = await freePort();
    const child = spawn(
      'redis-server',
      ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no', '--dir', tmp],
      { stdio: ['ignore', 'pipe', 'pipe'] },
    );
    let output = '';
    child.stdout.setEncoding('utf8');
    child.stderr.setEncoding('utf8');
    child.stdout.on('data', (c) => {
      output = (output + c).slice(-5000);
    });
    child.stderr.on('data', (c) => {
      output = (output + c).slice(-5000);
    });
    const state = { port, child, exited: false, output: () => output };
    state.gone = new Promise((resolve) => {
      child.on('exit', () => {
        state.exited = true;
        resolve();
      });
      child.on('error', (e) => {
        output += `\nspawn error: ${e.message}`;
        state.exited = true;
        resolve();
      });
    });
    state.kill = async () => {
      if (!state.exited) child.kill('SIGKILL');
      await withTimeout(state.gone, 3000, 'redis-server exit after SIGKILL');
    };
    const deadline = Date.now() + 5000;
    while (!state.exited && Date.now() < deadline) {
      const pong = await redisCli(port, 'ping').catch(() => '');
      if (pong === 'PONG') return state;
      await sleep(50);
    }
    lastError = `redis-server on port ${port} did not answer PING within 5 s (exited: ${state.exited}); output:\n${output}`;
    await state.kill().catch(() => {});
  }
  throw new Error(lastError);
}

process.on('exit', () => {
  if (redis && !redis.exited) {
    try {
      redis.child.kill('SIGKILL');
    } catch {
      // already gone
    }
  }
});

// ---------------------------------------------------------------------------

before(async () => {
  const absent = ['redis-server', 'redis-cli'].filter((cmd) => !installed(cmd));
  if (absent.length > 0) {
    missing = missingMessage(absent);
    return; // every test then fails with this message
  }
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tc-js-redis-'));
  redis = await startRedis(dir);
  jwks = await startJwks([key.jwk]);
  broker = await startBroker({
    TC_COGNITO_ISSUER: COGNITO_ISSUER,
    TC_COGNITO_CLIENT_ID: COGNITO_CLIENT_ID,
    TC_COGNITO_JWKS_URL: jwks.url,
    TC_JWKS_MIN_REFETCH: '1s',
    TC_REDIS_URL: `redis://127.0.0.1:${redis.port}`,
    TC_RATE_LIMITS_REFRESH: '500ms',
    TC_RATE_LIMIT_PER_TENANT: '100',
  });
});

after(async () => {
  closeAllSockets();
  await broker?.stop();
  await jwks?.close();
  await redis?.kill().catch(() => {});
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

describe('Redis: Cognito memberships in tc:memberships', () => {
  it('a member of 2 tenants must pick one, and gets the one picked', { timeout: 15_000 }, async () => {
    requireRedis();
    assert.equal(
      await redisCli(redis.port, 'HSET', 'tc:memberships', 'user-r', '["tenant-r1","tenant-r2"]'),
      '1',
    );
    assert.equal(
      await connectRefused(broker.http, { auth: { token: idToken('user-r') } }),
      'activeTenantId required: user belongs to 2 tenants',
    );
    const c = await connectOk(broker.http, { auth: { token: idToken('user-r'), activeTenantId: 'tenant-r2' } });
    assert.equal(c.sessions[0].tenant_id, 'tenant-r2');
    // It is a working socket of that tenant.
    const [published] = await publish(broker.http, backendToken({ tenant: 'tenant-r2', sub: 'svc' }), [
      { type: 'cost.updated', data: { owner: 'tenant-r2' } },
    ]);
    await waitFor(() => c.regular().length >= 1, { what: "tenant-r2's event", state: () => c.events });
    assert.equal(c.regular()[0].id, published.id);
    c.close();
    assert.equal(
      await connectRefused(broker.http, { auth: { token: idToken('user-r'), activeTenantId: 'tenant-x' } }),
      'no membership in tenant-x',
    );
  });

  it('a member of exactly one tenant needs no activeTenantId', async () => {
    requireRedis();
    await redisCli(redis.port, 'HSET', 'tc:memberships', 'user-one-r', '["tenant-o"]');
    const c = await connectOk(broker.http, { auth: { token: idToken('user-one-r') } });
    assert.equal(c.sessions[0].tenant_id, 'tenant-o');
    c.close();
  });

  it('a user with no entry in the hash', async () => {
    requireRedis();
    assert.equal(
      await redisCli(redis.port, 'HEXISTS', 'tc:memberships', 'user-nobody'),
      '0',
    );
    assert.equal(
      await connectRefused(broker.http, { auth: { token: idToken('user-nobody') } }),
      'user has no tenant membership',
    );
  });

  it('an HSET is seen at the next handshake, without a restart', async () => {
    requireRedis();
    assert.equal(
      await connectRefused(broker.http, { auth: { token: idToken('user-r'), activeTenantId: 'tenant-r3' } }),
      'no membership in tenant-r3',
    );
    await redisCli(redis.port, 'HSET', 'tc:memberships', 'user-r', '["tenant-r1","tenant-r2","tenant-r3"]');
    const c = await connectOk(broker.http, { auth: { token: idToken('user-r'), activeTenantId: 'tenant-r3' } });
    assert.equal(c.sessions[0].tenant_id, 'tenant-r3');
    c.close();
    assert.equal(
      await connectRefused(broker.http, { auth: { token: idToken('user-r') } }),
      'activeTenantId required: user belongs to 3 tenants',
    );
  });

  it('a comma-separated value works too', async () => {
    requireRedis();
    await redisCli(redis.port, 'HSET', 'tc:memberships', 'user-c', 'tenant-c1,tenant-c2');
    assert.equal(
      await connectRefused(broker.http, { auth: { token: idToken('user-c') } }),
      'activeTenantId required: user belongs to 2 tenants',
    );
    for (const tenant of ['tenant-c1', 'tenant-c2']) {
      const c = await connectOk(broker.http, { auth: { token: idToken('user-c'), activeTenantId: tenant } });
      assert.equal(c.sessions[0].tenant_id, tenant);
      c.close();
    }
  });
});

describe('Redis: per-tenant rate limits in tc:ratelimits', () => {
  it('an HSET changes the rate within a refresh, and the tenant is paced at it', { timeout: 20_000 }, async () => {
    requireRedis();
    const token = backendToken({ tenant: 'tenant-rl', sub: 'svc-rl' });
    const first = await connectOk(broker.http, { auth: { token } });
    assert.equal(first.sessions[0].rate_limit.events_per_second, 100, 'the configured default before any HSET');
    first.close();

    await redisCli(redis.port, 'HSET', 'tc:ratelimits', 'tenant-rl', '7');
    await sleep(1500); // three refreshes at TC_RATE_LIMITS_REFRESH=500ms
    const c = await connectOk(broker.http, { auth: { token } });
    assert.equal(c.sessions[0].rate_limit.events_per_second, 7, 'the rate from Redis');
    const arrivals = []; // ms since t0 of each regular event
    let t0 = 0;
    c.socket.on('event', (e) => {
      if (!e.type.startsWith('system.')) arrivals.push(Date.now() - t0);
    });

    const events = Array.from({ length: 40 }, (_, i) => ({ type: 'rl.tick', data: { i } }));
    t0 = Date.now();
    const ids = (await publish(broker.http, token, events)).map((r) => r.id);
    assert.equal(ids.length, 40);
    await sleep(2000 - (Date.now() - t0));

    const inTwoSeconds = arrivals.filter((ms) => ms <= 2000).length;
    assert.ok(inTwoSeconds >= 7, `the first burst of 7 came at once: ${inTwoSeconds} in 2 s`);
    assert.ok(inTwoSeconds <= 7 + 7 * 2 + 2, `paced at 7/s: ${inTwoSeconds} events in the first 2 s`);
    // At every arrival, no more than the burst plus 7/s so far (+2 slack).
    arrivals.forEach((ms, k) => {
      if (ms <= 2000) {
        assert.ok(k + 1 <= 7 + (7 * ms) / 1000 + 2, `event ${k + 1} arrived at ${ms} ms: faster than 7/s`);
      }
    });
    const received = c.regular().map((e) => e.id);
    assert.deepEqual(received, ids.slice(0, received.length), 'what arrived so far is a prefix, in publish order');

    // The rest follow at the same pace, none lost (queue 1000), in order.
    await waitFor(() => c.regular().length >= 40, {
      timeoutMs: 6000,
      what: 'all 40 events at 7/s',
      state: () => ({ received: c.regular().length, notices: c.events.filter((e) => e.type.startsWith('system.')) }),
    });
    await sleep(200);
    assert.deepEqual(
      c.regular().map((e) => e.id),
      ids,
      'all 40, in publish order, no duplicates',
    );
    c.close();
  });
});

describe('Redis down', () => {
  it('memberships only in Redis are refused; HS256 sockets connect and receive events', { timeout: 20_000 }, async () => {
    requireRedis();
    await redis.kill();
    assert.equal(redis.exited, true, 'redis-server was killed');
    assert.notEqual(await redisCli(redis.port, 'ping').catch(() => 'down'), 'PONG');

    assert.equal(
      await connectRefused(
        broker.http,
        { auth: { token: idToken('user-r'), activeTenantId: 'tenant-r2' } },
        8000,
      ),
      'cannot read tenant memberships now: Redis is unavailable',
    );

    const token = backendToken({ tenant: 'tenant-down', sub: 'svc-down' });
    const c = await connectOk(broker.http, { auth: { token } }, 8000);
    assert.equal(c.sessions[0].tenant_id, 'tenant-down');
    const ids = (
      await publish(broker.http, token, [
        { type: 'cost.updated', data: { n: 1 } },
        { type: 'alert.created', data: { n: 2 } },
        { type: 'cost.updated', data: { n: 3 } },
      ])
    ).map((r) => r.id);
    await waitFor(() => c.regular().length >= 3, {
      timeoutMs: 5000,
      what: '3 events delivered in-process while Redis is down',
      state: () => ({ events: c.events, stderr: broker.stderr().slice(-2000) }),
    });
    await sleep(200);
    assert.deepEqual(
      c.regular().map((e) => e.id),
      ids,
      'all 3, in order, once',
    );
    c.close();
  });
});
