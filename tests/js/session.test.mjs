// A socket's session over time: token expiry, in-place token refresh,
// recovery after a dropped connection, and narrowing the type filter.

import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';

import {
  RFC3339_MILLIS,
  backendToken,
  closeAllSockets,
  connect,
  connectOk,
  emitAck,
  isoSeconds,
  now,
  publish,
  sleep,
  startBroker,
  waitFor,
} from './harness.mjs';

let broker;

before(async () => {
  broker = await startBroker({ TC_RATE_LIMIT_PER_TENANT: '100000' });
});

after(async () => {
  closeAllSockets();
  await broker?.stop();
});

const events = (type, n, extra = {}) =>
  Array.from({ length: n }, (_, i) => ({ type, data: { i, ...extra } }));

describe('token expiry', () => {
  it('an expiring token ends the socket with disconnect_reason token_expired', { timeout: 15_000 }, async () => {
    const exp = now() - 27; // inside the 30 s leeway for about 3 more seconds
    const token = backendToken({ tenant: 'tenant-exp', sub: 'user-exp', exp });
    const c = await connectOk(broker.http, { auth: { token } });
    assert.equal(c.sessions[0].token_expires_at, isoSeconds(exp));
    const results = await publish(broker.http, token, events('cost.updated', 1));
    await waitFor(() => c.events.length === 1, { what: 'one event before expiry' });

    await waitFor(() => c.disconnects.length > 0, {
      timeoutMs: 8000,
      what: 'the server to disconnect the expired socket',
      state: () => c.order,
    });
    assert.equal(c.reasons.length, 1, 'one disconnect_reason');
    const reason = c.reasons[0];
    assert.deepEqual(Object.keys(reason).sort(), ['code', 'last_event_id', 'message']);
    assert.equal(reason.code, 'token_expired');
    assert.ok(reason.message.startsWith('token expired at'), reason.message);
    assert.ok(reason.message.includes(isoSeconds(exp)), reason.message);
    assert.equal(reason.last_event_id, results[0].id);
    assert.deepEqual(c.disconnects, ['io server disconnect']);
    const at = c.order.indexOf('disconnect_reason');
    assert.ok(at >= 0 && c.order[at + 1] === 'disconnect:io server disconnect', `order: ${c.order}`);
    assert.equal(c.socket.connected, false);
  });
});

describe('token refresh', () => {
  it('refresh_token extends the session in place', { timeout: 20_000 }, async () => {
    const tenant = 'tenant-refresh';
    const token = backendToken({ tenant, sub: 'user-r', exp: now() - 27 });
    const c = await connectOk(broker.http, { auth: { token } });
    const freshExp = now() + 600;
    const ack = await emitAck(c, 'refresh_token', {
      token: backendToken({ tenant, sub: 'user-r', exp: freshExp }),
    });
    assert.deepEqual(ack, { ok: true, token_expires_at: isoSeconds(freshExp) });
    assert.match(ack.token_expires_at, RFC3339_MILLIS);

    await sleep(6000); // the first token is now well past exp + leeway
    assert.equal(c.socket.connected, true, `still connected: ${c.order}`);
    assert.deepEqual(c.reasons, []);
    assert.deepEqual(c.disconnects, []);
    const results = await publish(broker.http, backendToken({ tenant, sub: 'publisher' }), events('cost.updated', 3));
    await waitFor(() => c.events.length >= 3, { what: 'events after the refresh', state: () => c.order });
    assert.deepEqual(
      c.events.map((e) => e.id),
      results.map((r) => r.id),
    );
    c.close();
  });

  it('refresh_token with a token for another tenant is refused', async () => {
    const c = await connectOk(broker.http, {
      auth: { token: backendToken({ tenant: 'tenant-r1', sub: 'user-r' }) },
    });
    const ack = await emitAck(c, 'refresh_token', {
      token: backendToken({ tenant: 'tenant-r2', sub: 'user-r', exp: now() + 900 }),
    });
    assert.equal(ack.ok, false);
    // Issue 9: the refusal names the socket's tenant as such.
    assert.equal(
      ack.error,
      "this token does not give access to the socket's tenant tenant-r1: refresh with a token for it, or reconnect to switch tenants",
    );
    assert.equal(c.socket.connected, true);
    c.close();
  });

  it('refresh_token with a token for another user is refused', async () => {
    const c = await connectOk(broker.http, {
      auth: { token: backendToken({ tenant: 'tenant-r1', sub: 'user-r' }) },
    });
    const ack = await emitAck(c, 'refresh_token', {
      token: backendToken({ tenant: 'tenant-r1', sub: 'someone-else', exp: now() + 900 }),
    });
    assert.deepEqual(ack, { ok: false, error: 'token is for another user: reconnect to switch users' });
    c.close();
  });

  it('refresh_token with a bad token or no token says why', async () => {
    const c = await connectOk(broker.http, {
      auth: { token: backendToken({ tenant: 'tenant-r1', sub: 'user-r' }) },
    });
    const expired = await emitAck(c, 'refresh_token', {
      token: backendToken({ tenant: 'tenant-r1', sub: 'user-r', exp: now() - 120 }),
    });
    assert.equal(expired.ok, false);
    assert.ok(expired.error.startsWith('token expired at'), expired.error);
    const missing = await emitAck(c, 'refresh_token', {});
    assert.deepEqual(missing, { ok: false, error: 'refresh_token expects { token }' });
    c.close();
  });
});

describe('recovery', () => {
  it('after a dropped connection the client resumes from lastEventId and misses nothing', { timeout: 20_000 }, async () => {
    const tenant = 'tenant-recover';
    const token = backendToken({ tenant, sub: 'user-rec' });
    let lastSeen;
    const c = connect(broker.http, {
      auth: (cb) => cb(lastSeen ? { token, lastEventId: lastSeen } : { token }),
      reconnection: true,
      reconnectionDelay: 500,
      reconnectionDelayMax: 500,
      randomizationFactor: 0,
    });
    c.socket.on('event', (e) => {
      lastSeen = e.id;
    });
    await waitFor(() => c.sessions.length === 1, { what: 'first session', state: () => c.errors });
    assert.equal(c.sessions[0].resumed, false);

    const published = [];
    const first = await publish(broker.http, token, events('cost.updated', 5, { batch: 1 }));
    published.push(...first.map((r) => r.id));
    await waitFor(() => c.events.length >= 5, { what: 'first batch' });

    // Drop the transport; the client reconnects by itself after 500 ms.
    c.socket.io.engine.close();
    const missed = await publish(broker.http, token, [
      ...events('cost.updated', 3, { batch: 2 }),
      ...events('alert.created', 2, { batch: 2 }),
    ]);
    published.push(...missed.map((r) => r.id));
    assert.equal(c.sessions.length, 1, 'published while disconnected');
    assert.ok(c.disconnects.length >= 1, 'the client saw the transport close');

    await waitFor(() => c.sessions.length === 2, {
      timeoutMs: 8000,
      what: 'the reconnect session',
      state: () => ({ order: c.order, errors: c.errors }),
    });
    const s = c.sessions[1];
    assert.equal(s.resumed, true);
    assert.equal(s.recovered, true);
    assert.ok(s.replayed >= 1, `replayed ${s.replayed}`);

    const after = await publish(broker.http, token, events('cost.updated', 2, { batch: 3 }));
    published.push(...after.map((r) => r.id));
    await waitFor(() => published.every((id) => c.events.some((e) => e.id === id)), {
      timeoutMs: 5000,
      what: 'every published event',
      state: () => ({ published, received: c.events.map((e) => e.id) }),
    });
    const firstSeen = [];
    for (const e of c.events) if (!firstSeen.includes(e.id)) firstSeen.push(e.id);
    assert.deepEqual(firstSeen, published, 'every event, in publish order');
    c.close();
  });

  it('an unknown lastEventId is not recovered', async () => {
    const token = backendToken({ tenant: 'tenant-recover', sub: 'user-rec' });
    const c = await connectOk(broker.http, { auth: { token, lastEventId: 'no-such-event-id' } });
    assert.equal(c.sessions[0].resumed, true);
    assert.equal(c.sessions[0].recovered, false);
    c.close();
  });

  it('a lastEventId that is not an identifier is refused', async () => {
    const token = backendToken({ tenant: 'tenant-recover', sub: 'user-rec' });
    const c = connect(broker.http, { auth: { token, lastEventId: 'bad id/with spaces' } });
    await waitFor(() => c.errors.length || c.sessions.length, { what: 'refusal' });
    assert.equal(c.sessions.length, 0);
    assert.ok(c.errors[0].startsWith('auth.lastEventId:'), c.errors[0]);
    c.close();
  });
});

describe('type filters', () => {
  it('auth.types narrows; subscribe replaces the filter; a bad pattern is refused', { timeout: 15_000 }, async () => {
    const tenant = 'tenant-filter';
    const token = backendToken({ tenant, sub: 'user-f' });
    const c = await connectOk(broker.http, { auth: { token, types: ['cost.*'] } });
    assert.deepEqual(c.sessions[0].types, ['cost.*']);

    const mixed = (round) => [
      { type: 'cost.updated', data: { round } },
      { type: 'alert.created', data: { round } },
      { type: 'cost.budget.exceeded', data: { round } },
      { type: 'alert.resolved', data: { round } },
      { type: 'costs.other', data: { round } },
    ];
    const r1 = await publish(broker.http, token, mixed(1));
    await waitFor(() => c.events.length >= 2, { what: 'cost.* events of round 1' });
    await sleep(200);
    assert.deepEqual(
      c.events.map((e) => e.id),
      [r1[0].id, r1[2].id],
      'only cost.* of round 1',
    );

    const ack = await emitAck(c, 'subscribe', { types: ['alert.*'] });
    assert.deepEqual(ack, { ok: true, types: ['alert.*'] });
    const before = c.events.length;
    const r2 = await publish(broker.http, token, mixed(2));
    await waitFor(() => c.events.length >= before + 2, { what: 'alert.* events of round 2' });
    await sleep(200);
    assert.deepEqual(
      c.events.slice(before).map((e) => e.id),
      [r2[1].id, r2[3].id],
      'only alert.* of round 2',
    );

    const bad = await emitAck(c, 'subscribe', { types: ['Bad'] });
    assert.equal(bad.ok, false);
    assert.ok(bad.error.includes('types[0]'), bad.error);
    const malformed = await emitAck(c, 'subscribe', 'cost.*');
    assert.equal(malformed.ok, false);

    // The refused subscribes left the alert.* filter in place.
    const before3 = c.events.length;
    const r3 = await publish(broker.http, token, mixed(3));
    await waitFor(() => c.events.length >= before3 + 2, { what: 'alert.* events of round 3' });
    await sleep(200);
    assert.deepEqual(
      c.events.slice(before3).map((e) => e.id),
      [r3[1].id, r3[3].id],
    );
    c.close();
  });
});
