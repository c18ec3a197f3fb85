// Webhooks seen from a Node integrator: a real node:http receiver, deliveries
// verified with node:crypto exactly as docs/webhooks.md shows, secret
// rotation, retries on the schedule, and the REST API's refusals.
//
// The broker allows 127.0.0.1 as a destination and retries after 1 s, 1 s
// and 1 s (each ±10%), so a full retry run takes about two seconds.

import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import http from 'node:http';
import { after, before, describe, it } from 'node:test';

import { backendToken, startBroker, waitFor } from './harness.mjs';

// ---------------------------------------------------------------------------
// What an integrator writes (docs/webhooks.md, "Verifying the signature")

/**
 * True if `header` (X-TensorCost-Signature) carries a v1 signature of
 * `rawBody` under `secret` and its timestamp is within `toleranceSec` of now.
 */
function verify(rawBody, header, secret, toleranceSec = 300) {
  const parts = String(header)
    .split(',')
    .map((p) => {
      const at = p.indexOf('=');
      return at < 0 ? [p, ''] : [p.slice(0, at), p.slice(at + 1)];
    });
  const tText = parts.find(([k]) => k === 't')?.[1];
  if (!tText || !/^\d+$/.test(tText)) return false;
  const t = Number(tText);
  if (Math.abs(Date.now() / 1000 - t) > toleranceSec) return false;
  const expected = crypto.createHmac('sha256', secret).update(`${tText}.${rawBody}`).digest();
  return parts
    .filter(([k]) => k === 'v1')
    .some(([, v]) => {
      if (!/^[0-9a-f]+$/.test(v)) return false;
      const got = Buffer.from(v, 'hex');
      return got.length === expected.length && crypto.timingSafeEqual(got, expected);
    });
}

/** Splits a signature header into `{t, v1: [...]}`. */
function parseSignature(header) {
  const out = { t: null, v1: [] };
  for (const part of String(header).split(',')) {
    const at = part.indexOf('=');
    const [k, v] = [part.slice(0, at), part.slice(at + 1)];
    if (k === 't') out.t = v;
    if (k === 'v1') out.v1.push(v);
  }
  return out;
}

const hmacHex = (secret, t, body) =>
  crypto.createHmac('sha256', secret).update(`${t}.${body}`).digest('hex');

// ---------------------------------------------------------------------------
// HTTP helpers

/** A JSON request to the broker: `{status, body, text, headers}`. */
async function api(method, path, { token, body, rawBody, headers = {} } = {}) {
  const h = { ...headers };
  if (token !== undefined) h.authorization = `Bearer ${token}`;
  let payload;
  if (rawBody !== undefined) payload = rawBody;
  else if (body !== undefined) payload = JSON.stringify(body);
  if (payload !== undefined) h['content-type'] = 'application/json';
  const res = await fetch(`${broker.http}${path}`, {
    method,
    headers: h,
    body: payload,
    signal: AbortSignal.timeout(10_000),
  });
  const text = await res.text();
  let json = null;
  try {
    json = text ? JSON.parse(text) : null;
  } catch {
    // not JSON: left in `text`
  }
  return { status: res.status, body: json, text, headers: res.headers };
}

/** Like `api`, but fails unless the status is `expected`. */
async function apiOk(expected, method, path, opts) {
  const res = await api(method, path, opts);
  assert.equal(res.status, expected, `${method} ${path}: HTTP ${res.status}: ${res.text}`);
  return res.body;
}

/**
 * A receiver on 127.0.0.1: records each request with its raw body and
 * answers with `respond(n)` (n = 1, 2, …), default 200.
 */
async function startReceiver(respond = () => 200) {
  const state = { requests: [] };
  const server = http.createServer((req, res) => {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => {
      state.requests.push({
        method: req.method,
        url: req.url,
        headers: req.headers,
        rawBody: Buffer.concat(chunks).toString('utf8'),
        receivedAt: Date.now(),
      });
      const status = respond(state.requests.length);
      res.writeHead(status, { 'content-type': 'text/plain' });
      res.end(status < 300 ? 'ok' : 'no');
    });
  });
  await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', resolve);
  });
  state.url = `http://127.0.0.1:${server.address().port}/hook`;
  state.close = () =>
    new Promise((resolve) => {
      server.closeAllConnections?.();
      server.close(() => resolve());
    });
  receivers.add(state);
  return state;
}

// ---------------------------------------------------------------------------
// Setup

let broker;
const receivers = new Set();

before(async () => {
  broker = await startBroker({
    TC_WEBHOOK_ALLOW_HOSTS: '127.0.0.1',
    TC_WEBHOOK_RETRY_SCHEDULE: '1s,1s,1s',
  });
});

after(async () => {
  for (const r of receivers) await r.close();
  await broker?.stop();
});

const ADMIN_SCOPE = 'integration:write integration:read events:publish';
const adminToken = (tenant) => backendToken({ tenant, sub: 'admin', scope: ADMIN_SCOPE });

/** Creates an endpoint for `tenant` to `url`; returns the creation answer. */
async function createEndpoint(tenant, url, types = ['cost.*']) {
  const created = await apiOk(201, 'POST', '/v1/webhooks', {
    token: adminToken(tenant),
    body: { url, types, description: `test ${tenant}` },
  });
  assert.match(created.secret, /^whsec_/, `secret: ${JSON.stringify(created)}`);
  return created;
}

/** Publishes one event for `tenant`; returns its id. */
async function publishOne(tenant, type, data) {
  const reply = await apiOk(200, 'POST', '/v1/events', {
    token: adminToken(tenant),
    body: { type, data },
  });
  assert.equal(reply.results.length, 1, JSON.stringify(reply));
  assert.equal(reply.results[0].duplicate, false);
  return reply.results[0].id;
}

const ENVELOPE_KEYS = ['data', 'id', 'tenant_id', 'timestamp', 'trace_id', 'type'];

// ---------------------------------------------------------------------------
// Tests

describe('verifying deliveries', () => {
  it('a delivery verifies with node:crypto; a tampered body or a wrong secret does not', { timeout: 15_000 }, async () => {
    const tenant = 'tenant-verify';
    const receiver = await startReceiver();
    const created = await createEndpoint(tenant, receiver.url);
    assert.equal(created.url, receiver.url);
    assert.deepEqual(created.types, ['cost.*']);
    assert.equal(created.enabled, true);

    // The list never shows the secret.
    const listed = await apiOk(200, 'GET', '/v1/webhooks', { token: adminToken(tenant) });
    const mine = listed.webhooks.find((w) => w.id === created.id);
    assert.ok(mine, `listed: ${JSON.stringify(listed)}`);
    assert.equal(mine.secret, undefined);
    assert.ok(!JSON.stringify(listed).includes(created.secret), 'the secret is not listed');

    const data = { amount: 12.5, currency: 'USD', note: 'naïve ✓' };
    const eventId = await publishOne(tenant, 'cost.updated', data);
    await waitFor(() => receiver.requests.length >= 1, {
      timeoutMs: 8000,
      what: 'the delivery',
      state: () => broker.stderr().slice(-2000),
    });
    const d = receiver.requests[0];

    assert.equal(d.method, 'POST');
    assert.equal(d.url, '/hook');
    assert.match(d.headers['content-type'], /^application\/json/);
    assert.match(d.headers['user-agent'], /^tensorcost-events\/\d+\.\d+\.\d+/);
    assert.equal(d.headers['x-tensorcost-event-id'], eventId);
    assert.equal(d.headers['x-tensorcost-delivery-attempt'], '1');

    const envelope = JSON.parse(d.rawBody);
    assert.deepEqual(Object.keys(envelope).sort(), ENVELOPE_KEYS);
    assert.equal(envelope.id, eventId);
    assert.equal(envelope.type, 'cost.updated');
    assert.equal(envelope.tenant_id, tenant);
    assert.deepEqual(envelope.data, data);

    const header = d.headers['x-tensorcost-signature'];
    assert.match(header, /^t=\d+,v1=[0-9a-f]{64}$/, `one signature before any rotation: ${header}`);
    const sig = parseSignature(header);
    assert.ok(Math.abs(Number(sig.t) - Date.now() / 1000) < 30, `t=${sig.t} is about now`);

    // The delivery verifies against its raw body.
    assert.equal(verify(d.rawBody, header, created.secret, 300), true, 'the delivery verifies');
    // A tampered body does not (a changed amount, and re-serialized JSON).
    const tampered = d.rawBody.replace('12.5', '99.5');
    assert.notEqual(tampered, d.rawBody);
    assert.equal(verify(tampered, header, created.secret, 300), false, 'tampered body');
    assert.equal(verify(`${d.rawBody} `, header, created.secret, 300), false, 'one byte more');
    // A wrong secret does not.
    assert.equal(verify(d.rawBody, header, `${created.secret}x`, 300), false, 'wrong secret');
    assert.equal(verify(d.rawBody, header, 'whsec_not-the-secret', 300), false, 'other secret');
    // Outside the tolerance it does not: a header stamped 10 minutes ago,
    // correctly signed, is refused with a 5 minute tolerance.
    const oldT = Number(sig.t) - 600;
    const oldHeader = `t=${oldT},v1=${hmacHex(created.secret, oldT, d.rawBody)}`;
    assert.equal(verify(d.rawBody, oldHeader, created.secret, 3600), true, 'old but within 1 h');
    assert.equal(verify(d.rawBody, oldHeader, created.secret, 300), false, 'older than 5 min');
    // A header whose timestamp was changed does not verify either.
    const movedT = header.replace(`t=${sig.t}`, `t=${Number(sig.t) + 1}`);
    assert.equal(verify(d.rawBody, movedT, created.secret, 300), false, 'changed t');

    // Exactly one delivery of that event.
    await new Promise((r) => setTimeout(r, 300));
    assert.equal(receiver.requests.length, 1, 'delivered once');
  });
});

describe('secret rotation', () => {
  it('after rotate-secret a delivery carries two v1 signatures; the old or the new secret verifies', { timeout: 15_000 }, async () => {
    const tenant = 'tenant-rotate';
    const receiver = await startReceiver();
    const created = await createEndpoint(tenant, receiver.url);
    const oldSecret = created.secret;

    const before = Date.now();
    const rotated = await apiOk(200, 'POST', `/v1/webhooks/${created.id}/rotate-secret`, {
      token: adminToken(tenant),
      body: { overlap: '1h' },
    });
    assert.match(rotated.secret, /^whsec_/);
    assert.notEqual(rotated.secret, oldSecret);
    const expires = Date.parse(rotated.previous_expires_at);
    assert.ok(Number.isFinite(expires), `previous_expires_at: ${rotated.previous_expires_at}`);
    assert.ok(
      Math.abs(expires - (before + 3600_000)) < 60_000,
      `previous_expires_at ${rotated.previous_expires_at} is about an hour from now`,
    );
    const newSecret = rotated.secret;

    const eventId = await publishOne(tenant, 'cost.updated', { rotated: true });
    await waitFor(() => receiver.requests.length >= 1, { timeoutMs: 8000, what: 'the delivery' });
    const d = receiver.requests[0];
    assert.equal(d.headers['x-tensorcost-event-id'], eventId);
    const header = d.headers['x-tensorcost-signature'];
    assert.match(header, /^t=\d+,v1=[0-9a-f]{64},v1=[0-9a-f]{64}$/, `two signatures: ${header}`);
    const sig = parseSignature(header);
    assert.equal(sig.v1.length, 2);
    // The new secret's signature comes first, the old one's second.
    assert.equal(sig.v1[0], hmacHex(newSecret, sig.t, d.rawBody), 'first v1 is the new secret');
    assert.equal(sig.v1[1], hmacHex(oldSecret, sig.t, d.rawBody), 'second v1 is the old secret');

    // A receiver holding either secret accepts the delivery.
    assert.equal(verify(d.rawBody, header, newSecret), true, 'the new secret verifies');
    assert.equal(verify(d.rawBody, header, oldSecret), true, 'the old secret verifies');
    assert.equal(verify(d.rawBody, header, `${newSecret}x`), false, 'a third secret does not');
    assert.equal(verify(`${d.rawBody}\n`, header, oldSecret), false, 'tampered body, old secret');
    assert.equal(verify(`${d.rawBody}\n`, header, newSecret), false, 'tampered body, new secret');

    // The rotated secret is not shown when the endpoint is read.
    const read = await apiOk(200, 'GET', `/v1/webhooks/${created.id}`, { token: adminToken(tenant) });
    assert.equal(read.secret, undefined);
    assert.ok(!JSON.stringify(read).includes(newSecret));
  });
});

describe('retries', () => {
  it('500, 500, then 200: three attempts of the same event, logged as two failures and one success', { timeout: 20_000 }, async () => {
    const tenant = 'tenant-retry';
    const answers = [500, 500, 200];
    const receiver = await startReceiver((n) => answers[n - 1] ?? 200);
    const created = await createEndpoint(tenant, receiver.url);

    const eventId = await publishOne(tenant, 'cost.updated', { retry: 'me' });
    await waitFor(() => receiver.requests.length >= 3, {
      timeoutMs: 12_000,
      what: 'three attempts',
      state: () => receiver.requests.map((r) => r.headers['x-tensorcost-delivery-attempt']),
    });
    // No fourth attempt after the 200 (the schedule would allow one in ~1 s).
    await new Promise((r) => setTimeout(r, 1500));
    assert.equal(receiver.requests.length, 3, 'no attempt after the success');

    const [a1, a2, a3] = receiver.requests;
    for (const r of receiver.requests) {
      assert.equal(r.headers['x-tensorcost-event-id'], eventId);
      assert.equal(JSON.parse(r.rawBody).id, eventId);
      assert.equal(verify(r.rawBody, r.headers['x-tensorcost-signature'], created.secret), true);
    }
    assert.deepEqual(
      receiver.requests.map((r) => r.headers['x-tensorcost-delivery-attempt']),
      ['1', '2', '3'],
    );
    // Each retry waits about 1 s (±10% jitter, plus scheduling slack).
    for (const [prev, next] of [
      [a1, a2],
      [a2, a3],
    ]) {
      const gap = next.receivedAt - prev.receivedAt;
      assert.ok(gap >= 800 && gap < 4000, `gap between attempts: ${gap} ms`);
    }

    const token = adminToken(tenant);
    const path = `/v1/webhooks/${created.id}/deliveries`;
    // The log may be written just after the answer: wait for all three rows.
    let all;
    const deadline = Date.now() + 5000;
    for (;;) {
      all = await apiOk(200, 'GET', `${path}?limit=50`, { token });
      if (all.deliveries.length >= 3 || Date.now() > deadline) break;
      await new Promise((r) => setTimeout(r, 100));
    }
    assert.equal(all.deliveries.length, 3, `deliveries: ${JSON.stringify(all)}`);
    // Newest first.
    assert.deepEqual(
      all.deliveries.map((x) => x.attempt),
      [3, 2, 1],
    );
    for (const x of all.deliveries) {
      assert.equal(x.event_id, eventId);
      assert.equal(x.event_type, 'cost.updated');
    }

    const failed = await apiOk(200, 'GET', `${path}?status=failed&limit=50`, { token });
    assert.equal(failed.deliveries.length, 2, `failed: ${JSON.stringify(failed)}`);
    for (const x of failed.deliveries) {
      assert.equal(x.status, 'failed');
      assert.equal(x.status_code, 500);
      assert.equal(x.event_id, eventId);
      assert.ok(x.next_attempt_at, `next_attempt_at set on a failed attempt: ${JSON.stringify(x)}`);
      assert.ok(Number.isFinite(Date.parse(x.next_attempt_at)), x.next_attempt_at);
      assert.ok(Date.parse(x.next_attempt_at) > Date.parse(x.at), `next after at: ${JSON.stringify(x)}`);
    }
    assert.deepEqual(
      failed.deliveries.map((x) => x.attempt),
      [2, 1],
    );

    const succeeded = await apiOk(200, 'GET', `${path}?status=succeeded&limit=50`, { token });
    assert.equal(succeeded.deliveries.length, 1, `succeeded: ${JSON.stringify(succeeded)}`);
    const ok = succeeded.deliveries[0];
    assert.equal(ok.status, 'succeeded');
    assert.equal(ok.status_code, 200);
    assert.equal(ok.attempt, 3);
    assert.equal(ok.event_id, eventId);
    assert.ok(ok.next_attempt_at == null, `no next attempt after success: ${JSON.stringify(ok)}`);

    // limit is honoured.
    const one = await apiOk(200, 'GET', `${path}?limit=1`, { token });
    assert.equal(one.deliveries.length, 1);
    assert.equal(one.deliveries[0].attempt, 3);
  });
});

describe('bad input gets clear errors', () => {
  const tenant = 'tenant-errors';
  const create = (body, token = adminToken(tenant)) =>
    api('POST', '/v1/webhooks', { token, body });

  /** Asserts an error answer: status, code, and returns the message. */
  function expectError(res, status, code) {
    assert.equal(res.status, status, `HTTP ${res.status}: ${res.text}`);
    assert.ok(res.body && typeof res.body === 'object', `JSON error body: ${res.text}`);
    assert.equal(res.body.code, code, res.text);
    assert.equal(typeof res.body.message, 'string', res.text);
    return res.body.message;
  }

  it('a non-http scheme is refused, naming the scheme', async () => {
    const msg = expectError(await create({ url: 'ftp://x', types: ['*'] }), 400, 'invalid_argument');
    assert.match(msg, /scheme/i);
    assert.match(msg, /ftp/);
  });

  it('credentials in the URL are refused without echoing the password', async () => {
    const res = await create({ url: 'https://u:p4ssw0rd-Secret@example.com/hook', types: ['*'] });
    const msg = expectError(res, 400, 'invalid_argument');
    assert.match(msg, /credentials/i);
    assert.ok(!res.text.includes('p4ssw0rd-Secret'), `password echoed: ${res.text}`);
    // The brief's exact example too.
    const res2 = await create({ url: 'https://u:p@example.com', types: ['*'] });
    const msg2 = expectError(res2, 400, 'invalid_argument');
    assert.match(msg2, /credentials/i);
    assert.ok(!res2.text.includes('u:p@'), `credentials echoed: ${res2.text}`);
  });

  it('an invalid type is refused, naming types[0]', async () => {
    const receiver = await startReceiver();
    const res = await create({ url: receiver.url, types: ['Not A Type'] });
    const msg = expectError(res, 400, 'invalid_argument');
    assert.ok(msg.includes('types[0]'), msg);
  });

  it('a missing token is 401', async () => {
    const res = await api('POST', '/v1/webhooks', { body: { url: 'https://example.com/h', types: ['*'] } });
    expectError(res, 401, 'unauthenticated');
    const list = await api('GET', '/v1/webhooks');
    expectError(list, 401, 'unauthenticated');
  });

  it('a token without integration:write is 403, naming the scope', async () => {
    const token = backendToken({ tenant, sub: 'reader', scope: 'events:publish integration:read' });
    const res = await create({ url: 'https://example.com/h', types: ['*'] }, token);
    const msg = expectError(res, 403, 'permission_denied');
    assert.ok(msg.includes('integration:write'), msg);
    // Reading with integration:read is allowed.
    const list = await api('GET', '/v1/webhooks', { token });
    assert.equal(list.status, 200, list.text);
    assert.ok(Array.isArray(list.body.webhooks), list.text);
    // Without any integration scope, reading is refused too.
    const none = backendToken({ tenant, sub: 'publisher', scope: 'events:publish' });
    const denied = await api('GET', '/v1/webhooks', { token: none });
    const m = expectError(denied, 403, 'permission_denied');
    assert.match(m, /integration:/, m);
  });

  it('a metadata address is refused as "destination refused" when only 127.0.0.1 is allowed', async () => {
    const res = await create({ url: 'http://169.254.169.254/', types: ['*'] });
    const msg = expectError(res, 400, 'invalid_argument');
    assert.ok(msg.includes('destination refused'), msg);
    // The allowed address is accepted, so the refusal is about the address.
    const receiver = await startReceiver();
    const ok = await create({ url: receiver.url, types: ['*'] });
    assert.equal(ok.status, 201, ok.text);
  });

  it('none of the refused endpoints was created', async () => {
    const list = await apiOk(200, 'GET', '/v1/webhooks', { token: adminToken(tenant) });
    const urls = list.webhooks.map((w) => w.url);
    for (const bad of ['ftp://x', '169.254.169.254', 'example.com']) {
      assert.ok(!urls.some((u) => u.includes(bad)), `${bad} in ${JSON.stringify(urls)}`);
    }
  });
});
