// Handshake refusals reach the client as connect_error with a message that
// says why; CORS on the polling transport.

import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';

import {
  SECRET,
  b64url,
  backendToken,
  closeAllSockets,
  connectOk,
  connectRefused,
  httpGet,
  isoSeconds,
  now,
  startBroker,
} from './harness.mjs';

let broker;
/** Every refusal message seen, with the token that caused it. */
const seen = [];

before(async () => {
  broker = await startBroker();
});

after(async () => {
  closeAllSockets();
  await broker?.stop();
});

async function refused(auth, opts = {}) {
  const message = await connectRefused(broker.http, { auth, ...opts });
  seen.push({ message, token: auth?.token });
  return message;
}

describe('handshake refusals', () => {
  it('no auth at all, or an empty auth object: auth.token required', async () => {
    const expected = "auth.token required: connect with io(url, { path: '/ws', auth: { token } })";
    assert.equal(await refused(undefined), expected);
    assert.equal(await refused({}), expected);
    assert.equal(await refused({ token: '   ' }), expected);
  });

  it('auth that is not an object', async () => {
    assert.equal(
      await refused('just-a-string'),
      'auth must be an object: { token, activeTenantId?, types?, lastEventId? }',
    );
  });

  it('expired HS256 token (past the 30 s leeway)', async () => {
    const exp = now() - 120;
    const message = await refused({ token: backendToken({ tenant: 'tenant-a', exp }) });
    assert.ok(message.startsWith('token expired at'), message);
    assert.equal(message, `token expired at ${isoSeconds(exp)}`);
  });

  it('HS256 token signed with another secret', async () => {
    const token = backendToken({ tenant: 'tenant-a', secret: 'not-the-broker-secret-0123456789abcdef' });
    const message = await refused({ token });
    assert.ok(message.startsWith('invalid signature'), message);
  });

  it('alg none', async () => {
    const token = `${b64url({ alg: 'none', typ: 'JWT' })}.${b64url({
      tenantId: 'tenant-a',
      scope: 'events:subscribe',
      exp: now() + 600,
    })}.`;
    assert.equal(
      await refused({ token }),
      'token algorithm "none" is not accepted: tokens must be signed',
    );
  });

  it('HS256 token of tenant-a with activeTenantId tenant-b', async () => {
    const token = backendToken({ tenant: 'tenant-a' });
    assert.equal(await refused({ token, activeTenantId: 'tenant-b' }), 'no membership in tenant-b');
    // Its own tenant is fine.
    const c = await connectOk(broker.http, { auth: { token, activeTenantId: 'tenant-a' } });
    assert.equal(c.sessions[0].tenant_id, 'tenant-a');
    c.close();
  });

  it('token without events:subscribe', async () => {
    const token = backendToken({ tenant: 'tenant-a', scope: 'events:publish' });
    assert.equal(
      await refused({ token }),
      'token lacks scope events:subscribe (it has: events:publish)',
    );
  });

  it('a bad type filter in auth.types', async () => {
    const token = backendToken({ tenant: 'tenant-a' });
    const message = await refused({ token, types: ['Cost.*'] });
    assert.ok(message.startsWith('auth.types[0]:'), message);
    assert.ok(message.includes('"Cost.*"'), message);
    const second = await refused({ token, types: ['cost.*', 'bad type'] });
    assert.ok(second.startsWith('auth.types[1]:'), second);
  });

  it('origin not allowed (default CORS: localhost only); localhost connects', async () => {
    const token = backendToken({ tenant: 'tenant-a' });
    assert.equal(
      await refused({ token }, { extraHeaders: { origin: 'http://evil.example' } }),
      'origin not allowed: http://evil.example',
    );
    const c = await connectOk(broker.http, {
      auth: { token },
      extraHeaders: { origin: 'http://localhost:5173' },
    });
    assert.equal(c.sessions[0].tenant_id, 'tenant-a');
    c.close();
  });

  it('no refusal message contains the token or the secret', () => {
    assert.ok(seen.length >= 10, `refusals recorded: ${seen.length}`);
    for (const { message, token } of seen) {
      assert.ok(!message.includes(SECRET), `secret in: ${message}`);
      assert.ok(!message.includes(SECRET.slice(0, 16)), `secret prefix in: ${message}`);
      if (typeof token === 'string' && token.trim()) {
        assert.ok(!message.includes(token), `token in: ${message}`);
        for (const part of token.split('.').filter((p) => p.length >= 8)) {
          assert.ok(!message.includes(part), `token part in: ${message}`);
        }
      }
    }
  });
});

describe('CORS on the polling transport', () => {
  const url = () => `${broker.http}/ws/?EIO=4&transport=polling`;

  it('an allowed origin is echoed in access-control-allow-origin', async () => {
    const res = await httpGet(url(), { origin: 'http://localhost:3000' });
    assert.equal(res.status, 200, res.body);
    assert.equal(res.headers['access-control-allow-origin'], 'http://localhost:3000');
    assert.equal(res.headers['access-control-allow-credentials'], 'true');
    assert.ok(res.body.startsWith('0{'), `engine.io open packet: ${res.body}`);
  });

  it('a foreign origin gets no access-control-allow-origin', async () => {
    const res = await httpGet(url(), { origin: 'http://evil.example' });
    assert.equal(res.headers['access-control-allow-origin'], undefined);
  });
});
