// The admin API end to end with socket.io-client: a Cognito user of no
// tenant is refused, made a member through PUT /v1/admin/memberships, and
// then connects; a tenant's emit rate lowered through
// PUT /v1/admin/tenants/{tenant}/rate-limit paces its sockets at once.

import assert from 'node:assert/strict';
import fs from 'node:fs';
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
  writeFileAtomic,
} from './harness.mjs';

let broker;
let jwks;
let dir;
const key = rsaKey('key-admin');
// An all-tenants backend token with scope admin (no tenant claim).
const admin = backendToken({ scope: 'admin events:all_tenants', sub: 'operator' });

async function call(method, route, body) {
  const res = await fetch(`${broker.http}${route}`, {
    method,
    headers: { authorization: `Bearer ${admin}`, 'content-type': 'application/json' },
    body: body === undefined ? undefined : JSON.stringify(body),
    signal: AbortSignal.timeout(10_000),
  });
  const text = await res.text();
  return { status: res.status, body: text ? JSON.parse(text) : null };
}

before(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tc-js-admin-'));
  const members = path.join(dir, 'memberships.json');
  writeFileAtomic(members, '{}');
  jwks = await startJwks([key.jwk]);
  broker = await startBroker({
    TC_COGNITO_ISSUER: COGNITO_ISSUER,
    TC_COGNITO_CLIENT_ID: COGNITO_CLIENT_ID,
    TC_COGNITO_JWKS_URL: jwks.url,
    TC_MEMBERSHIPS_FILE: members,
    TC_RATE_LIMIT_PER_TENANT: '100000',
  });
});

after(async () => {
  closeAllSockets();
  await broker?.stop();
  await jwks?.close();
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

describe('admin API', () => {
  it('a Cognito user made a member through the API connects', { timeout: 20_000 }, async () => {
    const token = signRs256(idTokenClaims('user-new'), key);
    const refused = await connectRefused(broker.http, { auth: { token } });
    assert.match(refused, /member of no tenant|no tenant|membership/i);

    const put = await call('PUT', '/v1/admin/memberships/user-new', { tenants: ['tenant-granted'] });
    assert.equal(put.status, 200, JSON.stringify(put.body));
    // The file is re-read within a second.
    let c;
    const deadline = Date.now() + 5000;
    while (!c) {
      try {
        c = await connectOk(broker.http, { auth: { token } });
      } catch (e) {
        if (Date.now() > deadline) throw e;
        await sleep(200);
      }
    }
    assert.equal(c.sessions[0].tenant_id, 'tenant-granted');
    c.close();

    assert.equal((await call('DELETE', '/v1/admin/memberships/user-new')).status, 204);
    await sleep(1500);
    await connectRefused(broker.http, { auth: { token } });
  });

  it('a rate limit lowered through the API paces the tenant at once', { timeout: 20_000 }, async () => {
    const tenant = 'tenant-paced';
    const set = await call('PUT', `/v1/admin/tenants/${tenant}/rate-limit`, { events_per_second: 5 });
    assert.deepEqual(set.body, { tenant, events_per_second: 5, source: 'override' });
    const token = backendToken({ tenant });
    const c = await connectOk(broker.http, { auth: { token } });
    await publish(
      broker.http,
      token,
      Array.from({ length: 40 }, (_, i) => ({ type: 'cost.updated', data: { i } })),
    );
    await sleep(1000);
    const got = c.regular().length;
    assert.ok(got >= 1 && got <= 15, `at 5 events/s, ${got} in about a second`);

    // Removed: back to the configured default, the rest arrive quickly.
    const removed = await call('DELETE', `/v1/admin/tenants/${tenant}/rate-limit`);
    assert.equal(removed.body.source, 'default');
    await waitFor(() => c.regular().length + dropped(c) >= 40, { timeoutMs: 5000, what: 'the rest' });
    c.close();
  });
});

/** Events the socket was told were dropped. */
function dropped(c) {
  return c.events
    .filter((e) => e.type === 'system.events_dropped')
    .reduce((sum, e) => sum + Object.values(e.data.dropped ?? {}).reduce((a, b) => a + b, 0), 0);
}
