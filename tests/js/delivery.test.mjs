// Delivery over both transports, the envelope, exact data text, per-type
// order, and tenant isolation.

import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';

import {
  ENVELOPE_KEYS,
  RFC3339_MILLIS,
  SESSION_KEYS,
  backendToken,
  closeAllSockets,
  connectOk,
  isoSeconds,
  now,
  publish,
  publishRaw,
  sleep,
  startBroker,
  waitFor,
} from './harness.mjs';

const TYPES = ['cost.updated', 'alert.created', 'ml.training.progress'];
const EXACT_DATA = '{"n":42,"f":1.50,"big":123456789012345678901234567890}';

let broker;

before(async () => {
  broker = await startBroker({ TC_RATE_LIMIT_PER_TENANT: '100000' });
});

after(async () => {
  closeAllSockets();
  await broker?.stop();
});

/** 200 events of 3 types as JSON body texts of 4 batches of 50; event 100 has EXACT_DATA. */
function batches() {
  const all = [];
  for (let i = 0; i < 200; i++) {
    const type = TYPES[i % 3];
    const data = i === 100 ? EXACT_DATA : JSON.stringify({ seq: i, label: `event ${i} "q" é` });
    all.push({ type, data });
  }
  const bodies = [];
  for (let b = 0; b < 4; b++) {
    const slice = all.slice(b * 50, b * 50 + 50);
    bodies.push(
      `{"events":[${slice.map((e) => `{"type":${JSON.stringify(e.type)},"data":${e.data}}`).join(',')}]}`,
    );
  }
  return { all, bodies };
}

async function deliveryOver(transport) {
  const tenant = `tenant-${transport}`;
  const exp = now() + 600;
  const token = backendToken({ tenant, sub: `sub-${transport}`, exp });
  const c = await connectOk(broker.http, { auth: { token }, transport });
  assert.equal(c.socket.io.engine.transport.name, transport, 'the transport asked for');

  // The session comes once and before anything else.
  assert.equal(c.order[0], 'session');
  assert.equal(c.sessions.length, 1);
  const s = c.sessions[0];
  assert.deepEqual(Object.keys(s).sort(), SESSION_KEYS);
  assert.equal(s.socket_id, c.socket.id);
  assert.equal(s.tenant_id, tenant);
  assert.equal(s.resumed, false);
  assert.equal(s.recovered, false);
  assert.equal(s.replayed, 0);
  assert.equal(s.token_expires_at, isoSeconds(exp));
  assert.deepEqual(s.rate_limit, { events_per_second: 100000, queue: 1000 });
  assert.deepEqual(s.types, ['*']);

  const { all, bodies } = batches();
  const ids = [];
  for (const body of bodies) {
    const results = await publishRaw(broker.http, token, body);
    assert.equal(results.length, 50);
    for (const r of results) {
      assert.equal(r.duplicate, false);
      ids.push(r.id);
    }
  }
  assert.equal(new Set(ids).size, 200, 'publish returned 200 distinct ids');

  await waitFor(() => c.events.length >= 200, {
    timeoutMs: 10_000,
    what: `200 events over ${transport}`,
    state: () => ({ received: c.events.length }),
  });
  await sleep(200); // anything extra would show up now
  assert.equal(c.events.length, 200, 'exactly the 200 published events');
  assert.equal(c.sessions.length, 1, 'session is sent once');
  assert.equal(c.order.filter((n) => n !== 'event').length, 1, 'nothing but session and event');

  const byId = new Map(ids.map((id, i) => [id, { ...all[i], index: i }]));
  for (const e of c.events) {
    assert.deepEqual(Object.keys(e).sort(), ENVELOPE_KEYS, 'envelope keys');
    const published = byId.get(e.id);
    assert.ok(published, `unknown id ${e.id}`);
    assert.equal(e.type, published.type);
    if (published.index !== 100) assert.deepEqual(e.data, JSON.parse(published.data));
    assert.match(e.timestamp, RFC3339_MILLIS);
    assert.match(e.trace_id, /^[0-9a-f]{32}$/);
  }

  // Per-type publish order.
  for (const type of TYPES) {
    const sent = ids.filter((_, i) => all[i].type === type);
    const got = c.events.filter((e) => e.type === type).map((e) => e.id);
    assert.deepEqual(got, sent, `order of ${type}`);
  }

  // The data text arrives byte for byte, in the raw Socket.IO packet.
  const special = ids[100];
  const packet = c.raw.find((p) => p.includes(special));
  assert.ok(packet, 'raw packet of the exact-data event');
  assert.ok(
    packet.includes(`"id":"${special}","type":"${all[100].type}","data":${EXACT_DATA},"timestamp":`),
    `exact data text in ${packet}`,
  );
  const parsed = c.events.find((e) => e.id === special);
  assert.equal(parsed.data.n, 42);
  for (let i = 0; i < 200; i += 37) {
    assert.ok(
      c.raw.some((p) => p.includes(`"id":"${ids[i]}","type":"${all[i].type}","data":${all[i].data},`)),
      `data text of event ${i}`,
    );
  }
  // The envelope never carries the tenant.
  assert.ok(!c.raw.some((p) => p.startsWith('2["event"') && p.includes('tenant_id')));
  c.close();
}

describe('delivery', () => {
  it('over websocket: session first, 200 events in per-type order, exact envelope and data', { timeout: 30_000 }, () =>
    deliveryOver('websocket'));

  it('over polling: session first, 200 events in per-type order, exact envelope and data', { timeout: 30_000 }, () =>
    deliveryOver('polling'));
});

describe('tenant isolation', () => {
  it('10 tenants x 5 sockets: every socket gets exactly its own tenant\'s 50 events', { timeout: 30_000 }, async () => {
    const tenants = Array.from({ length: 10 }, (_, i) => `iso-${i}`);
    const tokens = new Map(tenants.map((t) => [t, backendToken({ tenant: t, sub: `svc-${t}` })]));
    const clients = await Promise.all(
      tenants.flatMap((tenant) =>
        Array.from({ length: 5 }, async () => ({
          tenant,
          c: await connectOk(broker.http, { auth: { token: tokens.get(tenant) } }, 10_000),
        })),
      ),
    );
    for (const { tenant, c } of clients) assert.equal(c.sessions[0].tenant_id, tenant);

    const published = new Map();
    await Promise.all(
      tenants.map(async (tenant) => {
        const events = Array.from({ length: 50 }, (_, i) => ({
          type: i % 2 ? 'cost.updated' : 'alert.created',
          data: { owner: tenant, i },
        }));
        const results = await publish(broker.http, tokens.get(tenant), events);
        published.set(tenant, results.map((r) => r.id));
      }),
    );

    await waitFor(() => clients.every(({ c }) => c.events.length >= 50), {
      timeoutMs: 15_000,
      what: '50 events on every socket',
      state: () => clients.map(({ tenant, c }) => `${tenant}:${c.events.length}`),
    });
    await sleep(300); // another tenant's events would arrive by now
    for (const { tenant, c } of clients) {
      assert.equal(c.events.length, 50, `${tenant} socket got exactly 50`);
      const foreign = c.events.filter((e) => e.data.owner !== tenant);
      assert.deepEqual(foreign, [], `${tenant} socket got another tenant's events`);
      assert.deepEqual(
        c.events.map((e) => e.id),
        published.get(tenant),
        `${tenant} socket got its own events in order`,
      );
    }
    for (const { c } of clients) c.close();
  });
});
