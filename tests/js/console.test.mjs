// /console in a real headless browser (Debian's chromium, driven by
// playwright-core): the page loads, connects with a pasted token, shows an
// event published over gRPC, filters by type prefix, pauses and resumes,
// shows an event's JSON, refuses a bad token with the broker's message,
// fits a phone-sized screen, and in development mode connects by itself.
// TC_CONSOLE_SCREENSHOTS=<dir> also writes the screenshots docs/ shows.

import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';

import { chromium } from 'playwright-core';

import { BIN, backendToken, startBroker } from './harness.mjs';

const CHROMIUM = process.env.TC_CHROMIUM ?? '/usr/bin/chromium';
const SHOTS = process.env.TC_CONSOLE_SCREENSHOTS;

let broker;
let browser;

before(async () => {
  assert.ok(fs.existsSync(CHROMIUM), `no browser at ${CHROMIUM}: scripts/test installs Debian's chromium (or set TC_CHROMIUM)`);
  broker = await startBroker();
  browser = await chromium.launch({ executablePath: CHROMIUM, args: ['--no-sandbox'] });
});

after(async () => {
  await browser?.close();
  await broker?.stop();
});

/** Publishes over gRPC with the CLI. */
function publishGrpc(token, type, data) {
  execFileSync(BIN, ['publish', '--type', type, '--data', JSON.stringify(data)], {
    env: { PATH: process.env.PATH, TC_SERVER: `http://${broker.grpc}`, TC_TOKEN: token },
    stdio: ['ignore', 'ignore', 'pipe'],
  });
}

async function openConsole(viewport = { width: 1200, height: 900 }) {
  const page = await browser.newPage({ viewport });
  const errors = [];
  page.on('pageerror', (e) => errors.push(e.message));
  await page.goto(`${broker.http}/console`);
  return { page, errors };
}

async function connectWith(page, token) {
  await page.fill('#token', token);
  await page.click('#connect');
}

describe('/console', () => {
  it('connects with a token, shows live events, filters, pauses and shows JSON', { timeout: 30_000 }, async () => {
    const { page, errors } = await openConsole();
    assert.equal(await page.title(), 'tensorcost-events console');
    const token = backendToken({ tenant: 'tenant-console' });
    await connectWith(page, token);
    await page.waitForSelector('#state[data-state="connected"]', { timeout: 5000 });
    assert.match(await page.textContent('#state'), /tenant-console/);

    publishGrpc(token, 'instance.created', { instance_id: 'i-console' });
    await page.waitForSelector('#events li[data-type="instance.created"]', { timeout: 5000 });
    publishGrpc(token, 'cost.updated', { amount_usd: 12.5, source: 'bedrock' });
    publishGrpc(token, 'alert.created', { alert_id: 'a-1', severity: 'high' });
    await page.waitForFunction(() => document.querySelectorAll('#events li').length >= 3, null, { timeout: 5000 });

    // Another tenant's event never shows.
    publishGrpc(backendToken({ tenant: 'tenant-other' }), 'cost.updated', { amount_usd: 1, source: 'other' });

    // Filter by prefix.
    await page.fill('#filter', 'cost.');
    const types = await page.$$eval('#events li', (lis) => lis.map((li) => li.dataset.type));
    assert.deepEqual(types, ['cost.updated']);
    await page.fill('#filter', '');

    // Click an event: its JSON.
    await page.click('#events li[data-type="instance.created"]');
    const detail = JSON.parse(await page.textContent('#detail'));
    assert.equal(detail.type, 'instance.created');
    assert.deepEqual(detail.data, { instance_id: 'i-console' });
    assert.match(detail.trace_id, /^[0-9a-f]{32}$/);
    if (SHOTS) await page.screenshot({ path: path.join(SHOTS, 'console.png'), fullPage: true });

    // Pause: events are held, not shown, until resumed.
    await page.click('#pause');
    publishGrpc(token, 'cost.updated', { amount_usd: 3, source: 'held' });
    await page.waitForFunction(() => /held while paused/.test(document.querySelector('#counts').textContent), null, { timeout: 5000 });
    assert.equal(await page.$$eval('#events li', (lis) => lis.length), 3);
    await page.click('#pause');
    await page.waitForFunction(() => document.querySelectorAll('#events li').length === 4, null, { timeout: 5000 });

    // The publish form.
    await page.fill('#pub-type', 'recommendation.created');
    await page.fill('#pub-data', '{"recommendation_id":"r-1"}');
    await page.click('#publish');
    await page.waitForSelector('#events li[data-type="recommendation.created"]', { timeout: 5000 });
    assert.match(await page.textContent('#pub-result'), /^published /);
    const all = await page.$$eval('#events li .data', (spans) => spans.map((s) => s.textContent));
    assert.ok(!all.some((d) => d.includes('"other"')), 'another tenant\'s event was shown');
    assert.deepEqual(errors, []);
    await page.close();
  });

  it('a bad token is refused with the broker\'s message', { timeout: 20_000 }, async () => {
    const { page } = await openConsole();
    await connectWith(page, backendToken({ tenant: 'tenant-console', secret: 'not-the-secret-0123456789abcdef0123' }));
    await page.waitForSelector('#notice.bad', { timeout: 5000 });
    const text = await page.textContent('#notice');
    assert.match(text, /^refused: /);
    assert.match(text, /signature|token/i);
    assert.equal(await page.getAttribute('#state', 'data-state'), 'disconnected');
    await page.close();
  });

  it('fits a phone-sized screen', { timeout: 20_000 }, async () => {
    const { page } = await openConsole({ width: 390, height: 844 });
    const token = backendToken({ tenant: 'tenant-phone' });
    await connectWith(page, token);
    await page.waitForSelector('#state[data-state="connected"]', { timeout: 5000 });
    publishGrpc(token, 'cost.updated', { amount_usd: 12.5, source: 'bedrock', service: 'anthropic.claude-3-5-sonnet' });
    await page.waitForSelector('#events li', { timeout: 5000 });
    const width = await page.evaluate(() => document.documentElement.scrollWidth);
    assert.ok(width <= 390, `the page is ${width}px wide on a 390px screen`);
    if (SHOTS) await page.screenshot({ path: path.join(SHOTS, 'console-phone.png'), fullPage: true });
    await page.close();
  });

  it('in development mode, connects by itself, and only for this host', { timeout: 30_000 }, async () => {
    const dev = await startBroker({ TC_JWT_SECRET: '' });
    try {
      const page = await browser.newPage();
      await page.goto(`${dev.http}/console`);
      await page.waitForSelector('#state[data-state="connected"]', { timeout: 5000 });
      assert.match(await page.textContent('#state'), /tenant-dev/);
      await page.close();
    } finally {
      await dev.stop();
    }
    // A broker with a configured secret hands out nothing.
    const res = await fetch(`${broker.http}/console/dev-token`);
    assert.equal(res.status, 404);
  });

  it('serves its files with a strict policy, and nothing else under /console', async () => {
    const page = await fetch(`${broker.http}/console`);
    assert.equal(page.status, 200);
    assert.match(page.headers.get('content-security-policy'), /script-src 'self'/);
    const missing = await fetch(`${broker.http}/console/../../etc/passwd`);
    assert.equal(missing.status, 404);
    const unknown = await fetch(`${broker.http}/console/other.js`);
    assert.equal(unknown.status, 404);
    assert.match((await unknown.json()).message, /no such file/);
  });
});
