// socket.io-client over wss:// and https polling against the broker with
// TC_TLS_CERT / TC_TLS_KEY: certificates made here with the openssl command
// (a CA and the broker's certificate for 127.0.0.1); a client that trusts
// the CA gets its tenant's events over websocket, polling and the upgrade;
// one that does not, or that speaks plain text to the TLS port, is refused.

import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import https from 'node:https';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';

import { backendToken, closeAllSockets, connectOk, connectRefused, startBroker, waitFor } from './harness.mjs';

let broker;
let dir;
let ca;
let url;

function openssl(...args) {
  execFileSync('openssl', args, { cwd: dir, stdio: ['ignore', 'ignore', 'pipe'] });
}

before(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tc-js-tls-'));
  const ec = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes'];
  openssl('req', '-x509', ...ec, '-keyout', 'ca.key', '-out', 'ca.pem', '-subj', '/CN=js test CA', '-days', '1',
    '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign');
  openssl('req', ...ec, '-keyout', 'key.pem', '-out', 'broker.csr', '-subj', '/CN=broker');
  fs.writeFileSync(path.join(dir, 'ext.cnf'), 'subjectAltName=IP:127.0.0.1,DNS:localhost\n');
  openssl('x509', '-req', '-in', 'broker.csr', '-CA', 'ca.pem', '-CAkey', 'ca.key', '-CAcreateserial',
    '-out', 'cert.pem', '-days', '1', '-extfile', 'ext.cnf');
  ca = fs.readFileSync(path.join(dir, 'ca.pem'), 'utf8');
  broker = await startBroker({
    TC_TLS_CERT: path.join(dir, 'cert.pem'),
    TC_TLS_KEY: path.join(dir, 'key.pem'),
  });
  url = broker.http.replace('http://', 'https://');
});

after(async () => {
  closeAllSockets();
  await broker?.stop();
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

/** POST /v1/events over https, trusting the test CA. */
function publish(token, events) {
  return new Promise((resolve, reject) => {
    const body = JSON.stringify({ events });
    const req = https.request(
      `${url}/v1/events`,
      {
        method: 'POST',
        ca,
        headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' },
        timeout: 10_000,
      },
      (res) => {
        let text = '';
        res.setEncoding('utf8');
        res.on('data', (c) => (text += c));
        res.on('end', () =>
          res.statusCode === 200 ? resolve(JSON.parse(text).results) : reject(new Error(`HTTP ${res.statusCode}: ${text}`)),
        );
      },
    );
    req.on('error', reject);
    req.end(body);
  });
}

describe('Socket.IO over TLS', () => {
  for (const transports of [['websocket'], ['polling'], ['polling', 'websocket']]) {
    it(`${transports.join(' then ')}: the tenant's events arrive`, { timeout: 20_000 }, async () => {
      const tenant = `tls-${transports.join('-')}`;
      const token = backendToken({ tenant });
      const c = await connectOk(url, { auth: { token }, transport: transports[0], transports, ca });
      const [first] = await publish(token, [{ type: 'instance.created', data: { instance_id: 'i-1' } }]);
      await waitFor(() => c.regular().length > 0, { what: 'the event over TLS' });
      assert.equal(c.regular()[0].id, first.id);
      assert.deepEqual(c.regular()[0].data, { instance_id: 'i-1' });
      if (transports.length === 2) {
        await waitFor(() => c.socket.io.engine.transport.name === 'websocket', { what: 'the upgrade to websocket' });
      }
      c.close();
    });
  }

  it('a client that does not trust the CA is refused', { timeout: 20_000 }, async () => {
    const token = backendToken({ tenant: 'tls-untrusting' });
    const message = await connectRefused(url, { auth: { token } });
    assert.match(message, /websocket error|certificate|self.signed|unable/i);
  });

  it('plain text on the TLS port is refused', { timeout: 20_000 }, async () => {
    const token = backendToken({ tenant: 'tls-plain' });
    const message = await connectRefused(broker.http, { auth: { token } });
    assert.ok(message.length > 0);
    // The broker still serves TLS clients.
    const c = await connectOk(url, { auth: { token }, ca });
    c.close();
    assert.doesNotMatch(broker.stderr(), /panicked/);
  });
});
