// deploy/test runs this against deploy/compose.yaml's balancer (not part of
// `npm test`): the real socket.io-client receives, through HAProxy, events
// published over gRPC through HAProxy with the broker's CLI.
//  - a websocket client;
//  - a polling client with cookies (withCredentials): HAProxy's cookie keeps
//    its session on one instance, so it works;
//  - a polling client without cookies: round robin sends its requests to
//    both instances and the session breaks, which shows the stickiness is
//    what makes the second one work.
// Environment: LB_HTTP (host:port), LB_GRPC (host:port), TOKEN, TC_BIN;
// LB_SCHEME and LB_GRPC_SCHEME `https` for the balancer's TLS ports (with
// NODE_EXTRA_CA_CERTS and TC_CA_FILE naming the CA).
import { spawnSync } from 'node:child_process';
import { io } from 'socket.io-client';

const { LB_HTTP, LB_GRPC, TOKEN, TC_BIN } = process.env;
const SCHEME = process.env.LB_SCHEME || 'http';
const GRPC_SCHEME = process.env.LB_GRPC_SCHEME || 'http';
for (const [k, v] of Object.entries({ LB_HTTP, LB_GRPC, TOKEN, TC_BIN })) {
  if (!v) {
    console.error(`compose-check: ${k} is not set (deploy/test sets it)`);
    process.exit(2);
  }
}
const EVENTS = 20;
const PATIENCE_MS = 20000;

function client(name, options) {
  const c = { name, ids: new Set(), disconnects: [], errors: [] };
  c.socket = io(`${SCHEME}://${LB_HTTP}`, {
    path: '/ws',
    auth: { token: TOKEN },
    reconnection: false,
    forceNew: true,
    timeout: 5000,
    ...options,
  });
  c.session = new Promise((resolve, reject) => {
    c.socket.on('session', resolve);
    c.socket.on('connect_error', (e) => reject(new Error(`${name}: connect_error ${e.message}`)));
  });
  c.socket.on('event', (e) => {
    if (!e.type.startsWith('system.')) c.ids.add(e.id);
  });
  c.socket.on('disconnect', (reason) => c.disconnects.push(reason));
  return c;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function publish(id, i) {
  const out = spawnSync(
    TC_BIN,
    ['publish', '--server', `${GRPC_SCHEME}://${LB_GRPC}`, '--type', 'cost.updated', '--id', id, '--data', `{"i":${i}}`],
    { env: { ...process.env, TC_TOKEN: TOKEN }, encoding: 'utf8' },
  );
  if (out.status !== 0) throw new Error(`publish ${id} over gRPC through the balancer: ${out.stderr}`);
}

const ws = client('websocket', { transports: ['websocket'] });
const sticky = client('polling, sticky', { transports: ['polling'], withCredentials: true });
await Promise.all([ws.session, sticky.session]);
const loose = client('polling, no cookie', { transports: ['polling'], withCredentials: false });
let looseBroke = null;
loose.session.catch((e) => (looseBroke = e.message));
loose.socket.on('disconnect', (reason) => (looseBroke = `disconnected: ${reason}`));

const run = Date.now().toString(36);
const ids = [];
for (let i = 0; i < EVENTS; i++) {
  const id = `compose-${run}-${i}`;
  publish(id, i);
  ids.push(id);
  await sleep(100);
}

let failed = false;
const deadline = Date.now() + PATIENCE_MS;
for (const c of [ws, sticky]) {
  while (ids.some((id) => !c.ids.has(id)) && Date.now() < deadline) await sleep(100);
  const missing = ids.filter((id) => !c.ids.has(id));
  if (missing.length > 0 || c.disconnects.length > 0) {
    console.error(`FAILED ${c.name}: ${missing.length} of ${EVENTS} events missing, disconnects ${JSON.stringify(c.disconnects)}`);
    failed = true;
  } else {
    console.log(`ok ${c.name}: ${EVENTS} of ${EVENTS} events, no disconnect`);
  }
}
// Without the cookie the session cannot last: it is refused on the instance
// that does not hold it (or never completes its handshake).
while (looseBroke === null && Date.now() < deadline) await sleep(100);
if (looseBroke === null) {
  console.error(`FAILED ${loose.name}: the session survived round robin; is the balancer really in front of two instances?`);
  failed = true;
} else {
  console.log(`ok ${loose.name}: the session broke (${looseBroke}), as round robin without stickiness must`);
}
for (const c of [ws, sticky, loose]) c.socket.close();
process.exit(failed ? 1 : 0);
