// Cognito RS256 ID tokens: memberships and activeTenantId, claim checks,
// JWKS key rotation, algorithm confusion, and memberships reload.

import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';

import {
  COGNITO_CLIENT_ID,
  COGNITO_ISSUER,
  b64url,
  backendToken,
  closeAllSockets,
  connectOk,
  connectRefused,
  idTokenClaims,
  isoSeconds,
  now,
  publish,
  rsaKey,
  signHmac,
  signRs256,
  sleep,
  startBroker,
  startJwks,
  waitFor,
  writeFileAtomic,
} from './harness.mjs';

const MEMBERSHIPS = {
  'user-one': ['tenant-a'],
  'user-three': ['tenant-a', 'tenant-b', 'tenant-c'],
  'user-empty': [],
  'user-grows': ['tenant-a'],
};

let broker;
let jwks;
let dir;
let membershipsFile;
const keyA = rsaKey('key-a');
const keyB = rsaKey('key-b');

const idToken = (sub, overrides = {}, key = keyA) => signRs256(idTokenClaims(sub, overrides), key);

before(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tc-js-cognito-'));
  membershipsFile = path.join(dir, 'memberships.json');
  writeFileAtomic(membershipsFile, JSON.stringify(MEMBERSHIPS));
  jwks = await startJwks([keyA.jwk]);
  broker = await startBroker({
    TC_COGNITO_ISSUER: COGNITO_ISSUER,
    TC_COGNITO_CLIENT_ID: COGNITO_CLIENT_ID,
    TC_COGNITO_JWKS_URL: jwks.url,
    TC_JWKS_MIN_REFETCH: '1s',
    TC_MEMBERSHIPS_FILE: membershipsFile,
    TC_RATE_LIMIT_PER_TENANT: '100000',
  });
});

after(async () => {
  closeAllSockets();
  await broker?.stop();
  await jwks?.close();
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

describe('Cognito ID tokens', () => {
  it('a member of exactly one tenant needs no activeTenantId', async () => {
    const exp = now() + 300;
    const c = await connectOk(broker.http, { auth: { token: idToken('user-one', { exp }) } });
    const s = c.sessions[0];
    assert.equal(s.tenant_id, 'tenant-a');
    assert.equal(s.token_expires_at, isoSeconds(exp));
    c.close();
  });

  it('a member of 3 tenants must pick one', async () => {
    assert.equal(
      await connectRefused(broker.http, { auth: { token: idToken('user-three') } }),
      'activeTenantId required: user belongs to 3 tenants',
    );
  });

  it('with activeTenantId: connects to that tenant and receives only its events', { timeout: 15_000 }, async () => {
    const c = await connectOk(broker.http, {
      auth: { token: idToken('user-three'), activeTenantId: 'tenant-b' },
    });
    assert.equal(c.sessions[0].tenant_id, 'tenant-b');
    const pub = (tenant) => backendToken({ tenant, sub: 'backend', scope: 'events:publish' });
    const [c1, b1, a1] = await Promise.all([
      publish(broker.http, pub('tenant-c'), [{ type: 'cost.updated', data: { owner: 'tenant-c' } }]),
      publish(broker.http, pub('tenant-b'), [
        { type: 'cost.updated', data: { owner: 'tenant-b', n: 1 } },
        { type: 'alert.created', data: { owner: 'tenant-b', n: 2 } },
      ]),
      publish(broker.http, pub('tenant-a'), [{ type: 'cost.updated', data: { owner: 'tenant-a' } }]),
    ]);
    assert.equal(c1.length + a1.length, 2);
    await waitFor(() => c.events.length >= 2, { what: "tenant-b's 2 events", state: () => c.events });
    await sleep(200);
    assert.deepEqual(
      c.events.map((e) => e.id),
      b1.map((r) => r.id),
    );
    assert.ok(c.events.every((e) => e.data.owner === 'tenant-b'));
    c.close();
  });

  it('activeTenantId that is not a membership', async () => {
    assert.equal(
      await connectRefused(broker.http, {
        auth: { token: idToken('user-three'), activeTenantId: 'tenant-x' },
      }),
      'no membership in tenant-x',
    );
  });

  it('a user with no memberships', async () => {
    const expected = 'user has no tenant membership';
    assert.equal(await connectRefused(broker.http, { auth: { token: idToken('user-empty') } }), expected);
    assert.equal(await connectRefused(broker.http, { auth: { token: idToken('user-unknown') } }), expected);
  });

  it('an access token instead of the ID token', async () => {
    assert.equal(
      await connectRefused(broker.http, { auth: { token: idToken('user-one', { token_use: 'access' }) } }),
      'token_use is access: send the Cognito ID token, not the access token',
    );
  });

  it('wrong audience', async () => {
    assert.equal(
      await connectRefused(broker.http, { auth: { token: idToken('user-one', { aud: 'client-2' }) } }),
      "token audience is not this broker's Cognito app client",
    );
  });

  it('wrong issuer', async () => {
    assert.equal(
      await connectRefused(broker.http, {
        auth: { token: idToken('user-one', { iss: 'https://cognito-idp.test.local/pool-2' }) },
      }),
      "token issuer is not this broker's Cognito user pool",
    );
  });

  it('expired', async () => {
    const exp = now() - 120;
    const message = await connectRefused(broker.http, { auth: { token: idToken('user-one', { exp }) } });
    assert.ok(message.startsWith('token expired at'), message);
    assert.equal(message, `token expired at ${isoSeconds(exp)}`);
  });

  it('key rotation: a new kid in the JWKS is picked up without a restart', { timeout: 15_000 }, async () => {
    const a = await connectOk(broker.http, { auth: { token: idToken('user-one') } });
    assert.equal(a.sessions[0].tenant_id, 'tenant-a');
    a.close();
    jwks.keys.push(keyB.jwk);
    await sleep(1200); // past TC_JWKS_MIN_REFETCH since the last fetch
    const fetchesBefore = jwks.fetches;
    const b = await connectOk(broker.http, { auth: { token: idToken('user-one', {}, keyB) } });
    assert.equal(b.sessions[0].tenant_id, 'tenant-a');
    assert.ok(jwks.fetches > fetchesBefore, 'the unknown kid caused a JWKS fetch');
    b.close();
    // Key A still verifies.
    const again = await connectOk(broker.http, { auth: { token: idToken('user-one') } });
    again.close();
  });

  it('an unknown kid', async () => {
    const token = signRs256(idTokenClaims('user-one'), keyA, { alg: 'RS256', typ: 'JWT', kid: 'nope' });
    const message = await connectRefused(broker.http, { auth: { token } });
    assert.ok(message.startsWith('unknown signing key kid=nope'), message);
  });

  it('a key not in the JWKS cannot sign for a kid that is', async () => {
    const stranger = rsaKey('key-a');
    const message = await connectRefused(broker.http, {
      auth: { token: signRs256(idTokenClaims('user-one'), stranger) },
    });
    assert.equal(message, "invalid signature: the token was not signed by the user pool's key key-a");
  });

  it('HS256/RS256 confusion: HS256 signed with the RSA public key as secret', async () => {
    const claims = { ...idTokenClaims('user-one'), tenantId: 'tenant-a', scope: 'events:subscribe' };
    const token = signHmac(claims, keyA.pem, { alg: 'HS256', typ: 'JWT', kid: 'key-a' });
    const message = await connectRefused(broker.http, { auth: { token } });
    assert.ok(message.startsWith('invalid signature'), message);
    // Also with the DER and JWK "n" forms of the public key.
    for (const secret of [keyA.publicKey.export({ type: 'spki', format: 'der' }), keyA.jwk.n]) {
      const t = signHmac(claims, secret, { alg: 'HS256', typ: 'JWT' });
      const m = await connectRefused(broker.http, { auth: { token: t } });
      assert.ok(m.startsWith('invalid signature'), m);
    }
  });

  it('HS256/RS256 confusion: RS256 header with kid of key A but an HMAC signature', async () => {
    const claims = idTokenClaims('user-one');
    for (const secret of [keyA.pem, keyA.publicKey.export({ type: 'spki', format: 'der' })]) {
      const token = signHmac(claims, secret, { alg: 'RS256', typ: 'JWT', kid: 'key-a' });
      const message = await connectRefused(broker.http, { auth: { token } });
      assert.equal(message, "invalid signature: the token was not signed by the user pool's key key-a");
    }
  });

  it('RS256 header on a token with a forged (empty) signature', async () => {
    const input = `${b64url({ alg: 'RS256', typ: 'JWT', kid: 'key-a' })}.${b64url(idTokenClaims('user-one'))}`;
    const message = await connectRefused(broker.http, { auth: { token: `${input}.` } });
    assert.ok(message.length > 0);
    const random = crypto.randomBytes(256).toString('base64url');
    const m2 = await connectRefused(broker.http, { auth: { token: `${input}.${random}` } });
    assert.ok(m2.startsWith('invalid signature'), m2);
  });

  it('memberships file changes are picked up without a restart', { timeout: 15_000 }, async () => {
    assert.equal(
      await connectRefused(broker.http, {
        auth: { token: idToken('user-grows'), activeTenantId: 'tenant-new' },
      }),
      'no membership in tenant-new',
    );
    writeFileAtomic(
      membershipsFile,
      JSON.stringify({ ...MEMBERSHIPS, 'user-grows': ['tenant-a', 'tenant-new'] }),
    );
    await sleep(1500);
    const c = await connectOk(broker.http, {
      auth: { token: idToken('user-grows'), activeTenantId: 'tenant-new' },
    });
    assert.equal(c.sessions[0].tenant_id, 'tenant-new');
    c.close();
    // And now the user has two tenants: it must pick.
    assert.equal(
      await connectRefused(broker.http, { auth: { token: idToken('user-grows') } }),
      'activeTenantId required: user belongs to 2 tenants',
    );
  });
});
