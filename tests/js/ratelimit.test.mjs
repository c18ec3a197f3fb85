// The per-tenant emit rate limit: a noisy tenant is paced and told what was
// dropped, and delays nobody else.

import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';

import {
  backendToken,
  closeAllSockets,
  connectOk,
  metricValue,
  metricsText,
  publish,
  sleep,
  startBroker,
  waitFor,
} from './harness.mjs';

let broker;

before(async () => {
  broker = await startBroker({
    TC_RATE_LIMIT_PER_TENANT: '20',
    TC_RATE_LIMIT_QUEUE: '30',
    TC_RATE_LIMIT_OVERRIDES: 'tenant-fast=100000',
  });
});

after(async () => {
  closeAllSockets();
  await broker?.stop();
});

describe('rate limit', () => {
  it('a noisy tenant is paced, told what was dropped, and delays nobody else', { timeout: 20_000 }, async () => {
    const noisyToken = backendToken({ tenant: 'tenant-noisy', sub: 'svc-noisy' });
    const fastToken = backendToken({ tenant: 'tenant-fast', sub: 'svc-fast' });
    const [noisy, fast] = await Promise.all([
      connectOk(broker.http, { auth: { token: noisyToken } }),
      connectOk(broker.http, { auth: { token: fastToken } }),
    ]);
    assert.deepEqual(noisy.sessions[0].rate_limit, { events_per_second: 20, queue: 30 });
    assert.deepEqual(fast.sessions[0].rate_limit, { events_per_second: 100000, queue: 30 });

    const batch = (owner) =>
      Array.from({ length: 200 }, (_, i) => ({
        type: i % 2 ? 'noise.even' : 'noise.odd',
        data: { owner, i },
      }));
    const started = Date.now();
    const [noisyResults, fastResults] = await Promise.all([
      publish(broker.http, noisyToken, batch('tenant-noisy')),
      publish(broker.http, fastToken, batch('tenant-fast')),
    ]);
    const noisyIds = noisyResults.map((r) => r.id);
    const fastIds = fastResults.map((r) => r.id);

    // The other tenant gets all of its 200 at once.
    await waitFor(() => fast.events.length >= 200, {
      timeoutMs: 2000,
      what: "tenant-fast's 200 events within 2 s",
      state: () => ({ fast: fast.events.length, noisy: noisy.events.length }),
    });
    assert.ok(Date.now() - started < 2000);
    assert.deepEqual(
      fast.events.map((e) => e.id),
      fastIds,
      'tenant-fast: all 200, in order, no notices',
    );
    // Meanwhile the noisy tenant is still being paced.
    assert.ok(noisy.regular().length < 200, `noisy got ${noisy.regular().length} at once`);

    // Over the next seconds: received + dropped accounts for all 200.
    const notices = () => noisy.events.filter((e) => e.type === 'system.events_dropped');
    const droppedTotal = () => notices().reduce((n, e) => n + e.data.total, 0);
    await waitFor(() => noisy.regular().length + droppedTotal() >= 200, {
      timeoutMs: 6000,
      what: 'received + dropped == 200 for tenant-noisy',
      state: () => ({ received: noisy.regular().length, dropped: droppedTotal(), notices: notices() }),
    });
    await sleep(1300); // a late notice or event would be counted twice
    const regular = noisy.regular();
    assert.ok(notices().length >= 1, 'at least one system.events_dropped notice');
    let summed = 0;
    for (const n of notices()) {
      assert.deepEqual(Object.keys(n).sort(), ['data', 'id', 'timestamp', 'trace_id', 'type']);
      assert.deepEqual(Object.keys(n.data).sort(), ['dropped', 'reason', 'total']);
      assert.equal(n.data.reason, 'rate_limit');
      const counts = Object.entries(n.data.dropped);
      assert.ok(counts.length >= 1);
      for (const [type, count] of counts) {
        assert.ok(['noise.even', 'noise.odd'].includes(type), type);
        assert.ok(Number.isInteger(count) && count > 0);
      }
      assert.equal(n.data.total, counts.reduce((s, [, c]) => s + c, 0), 'total is the sum');
      summed += n.data.total;
    }
    assert.equal(regular.length + summed, 200, `received ${regular.length} + dropped ${summed}`);
    assert.ok(summed > 0);
    // Per-type drop counts match what is missing of each type.
    for (const type of ['noise.even', 'noise.odd']) {
      const sent = batch('x').filter((e) => e.type === type).length;
      const got = regular.filter((e) => e.type === type).length;
      const dropped = notices().reduce((s, n) => s + (n.data.dropped[type] ?? 0), 0);
      assert.equal(got + dropped, sent, `${type}: received ${got} + dropped ${dropped}`);
    }
    // What it did receive is a subsequence of the publish order, no duplicates.
    const positions = regular.map((e) => noisyIds.indexOf(e.id));
    assert.ok(positions.every((p) => p >= 0), 'only its own events');
    for (let i = 1; i < positions.length; i++) {
      assert.ok(positions[i] > positions[i - 1], `publish order at ${i}: ${positions}`);
    }
    // Paced: not everything arrived with the first burst.
    assert.ok(regular.length >= 20, `at least the burst: ${regular.length}`);
    assert.equal(fast.events.length, 200, 'tenant-fast got nothing extra');

    const text = await metricsText(broker.http);
    // No tenant label (one series, whatever the number of tenants): the
    // total is the noisy tenant's drops, tenant-fast dropping nothing.
    const dropped = metricValue(text, 'tc_socketio_rate_dropped_total');
    const delayed = metricValue(text, 'tc_socketio_rate_delayed_total');
    assert.ok(dropped > 0, `tc_socketio_rate_dropped_total = ${dropped}`);
    assert.ok(delayed > 0, `tc_socketio_rate_delayed_total = ${delayed}`);
    assert.equal(dropped, summed, 'the metric counts the same drops the socket was told of');
    assert.doesNotMatch(text, /tc_socketio_rate_\w+\{tenant=/, 'no per-tenant series');
    const emitted = metricValue(text, 'tc_publish_to_emit_seconds_count', '{transport="socketio"}');
    assert.ok(emitted > 0, `tc_publish_to_emit_seconds_count{transport="socketio"} = ${emitted}`);
    // The tenant is named in the log instead.
    assert.match(broker.stderr(), /tenant-noisy/);

    noisy.close();
    fast.close();
  });
});
