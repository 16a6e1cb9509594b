// Checks the operator's cockpit against a running testnet
// (scripts/cockpit/run.sh starts it, and Prometheus):
// 1. jobs through the gateway;
// 2. Prometheus, scraping the gateway and the worker, reports the same job
//    count and the same earnings as the nodes' own API (/v1/status);
// 3. `silk status` prints those numbers;
// 4. the dashboard, in headless Chromium, lists the worker and the jobs
//    just sent, its chart has points, nothing on the page errors, it fits a
//    phone's width; screenshots are saved.
// Usage: node check.mjs GATEWAY_URL WORKER_URL PROMETHEUS_URL SILK_BIN OUT_DIR
import { chromium } from 'playwright-core';
import { execFileSync } from 'node:child_process';
import { mkdirSync } from 'node:fs';
import assert from 'node:assert/strict';

const [gateway, worker, prometheus, silk, out] = process.argv.slice(2);
if (!out) {
  console.error('usage: node check.mjs GATEWAY_URL WORKER_URL PROMETHEUS_URL SILK_BIN OUT_DIR');
  process.exit(2);
}
mkdirSync(out, { recursive: true });
const JOBS = 3;
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function json(url, init) {
  const r = await fetch(url, init);
  const body = await r.json();
  assert.ok(r.ok, `${url}: HTTP ${r.status} ${JSON.stringify(body)}`);
  return body;
}

/** Polls `f` until it returns a value (not undefined) or `seconds` pass. */
async function until(what, seconds, f) {
  const deadline = Date.now() + seconds * 1000;
  let last;
  while (Date.now() < deadline) {
    try {
      const v = await f();
      if (v !== undefined) return v;
    } catch (e) {
      last = e;
    }
    await sleep(500);
  }
  throw new Error(`timed out waiting for ${what}${last ? `: ${last.message}` : ''}`);
}

// 1. Jobs through the gateway.
for (let i = 0; i < JOBS; i++) {
  const r = await json(`${gateway}/v1/chat/completions`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ messages: [{ role: 'user', content: `Count to ${i + 3}.` }], max_tokens: 16 }),
  });
  assert.ok(r.usage.completion_tokens > 0, 'the job produced tokens');
}
console.log(`sent ${JOBS} jobs through ${gateway}`);

// 2. Prometheus against the nodes' API. The worker's earnings land when the
// gateway's cheques arrive, so both sides are read until they settle.
const instance = (url) => new URL(url).host;
async function promValue(query) {
  const r = await json(`${prometheus}/api/v1/query?query=${encodeURIComponent(query)}`);
  assert.equal(r.status, 'success');
  const v = r.data.result[0];
  return v === undefined ? undefined : Number(v.value[1]);
}
const jobsQuery = `silk_jobs_total{instance="${instance(gateway)}",role="gateway",outcome="ok"}`;
const earnedQuery = `silk_earned_nanoton_total{instance="${instance(worker)}"}`;
const [jobsApi, jobsProm] = await until('Prometheus to report the gateway\'s jobs', 60, async () => {
  const api = (await json(`${gateway}/v1/status`)).jobs.gateway.ok;
  const prom = await promValue(jobsQuery);
  return api === JOBS && prom === api ? [api, prom] : undefined;
});
const [earnedApi, earnedProm] = await until('Prometheus to report the worker\'s earnings', 60, async () => {
  const api = (await json(`${worker}/v1/status`)).money.earned;
  const prom = await promValue(earnedQuery);
  return api > 0 && prom === api ? [api, prom] : undefined;
});
console.log(`Prometheus: ${jobsQuery} = ${jobsProm} (API: ${jobsApi})`);
console.log(`Prometheus: ${earnedQuery} = ${earnedProm} nanoTON (API: ${earnedApi})`);
const served = await promValue(`silk_jobs_total{instance="${instance(worker)}",role="worker",outcome="ok"}`);
assert.equal(served, JOBS, 'the worker counted the jobs it served');
const libp2p = await promValue(`libp2p_swarm_connections_established_total{instance="${instance(gateway)}"}`);
assert.ok(libp2p !== undefined, 'libp2p\'s own metrics are scraped too');

// 3. `silk status` shows the same numbers.
const text = execFileSync(silk, ['status', '--api', gateway], { encoding: 'utf8' });
assert.match(text, new RegExp(`gateway\\s*┆\\s*ok\\s*┆\\s*${jobsApi}\\s`), `silk status lists ${jobsApi} jobs:\n${text}`);
const workerText = execFileSync(silk, ['status', '--api', worker], { encoding: 'utf8' });
const earnedTon = (earnedApi / 1e9).toFixed(9).replace(/0+$/, '').replace(/\.$/, '');
assert.ok(workerText.includes(`earned            ┆ ${earnedTon} `), `silk status shows ${earnedTon} TON earned:\n${workerText}`);
console.log('silk status shows the same job count and earnings');

// 4. The dashboard in Chromium.
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--headless', '--no-sandbox', '--disable-background-networking'],
});
try {
  for (const [name, url, role] of [['gateway', gateway, 'gateway'], ['worker', worker, 'worker']]) {
    const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
    const problems = [];
    page.on('console', (m) => { if (m.type() === 'error' || m.type() === 'warning') problems.push(`console ${m.type()}: ${m.text()}`); });
    page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
    page.on('requestfailed', (r) => problems.push(`request failed: ${r.url()}`));
    page.on('request', (r) => { if (!r.url().startsWith(url)) problems.push(`request off the node: ${r.url()}`); });
    await page.goto(url + '/');
    await page.waitForSelector('#main:not([hidden])');
    // The jobs just sent, with their outcome.
    await page.waitForFunction(
      ([n, role]) => [...document.querySelectorAll('#recent tbody tr')]
        .filter((tr) => tr.cells[1]?.textContent === role && tr.cells[8]?.textContent === 'ok').length >= n,
      [JOBS, role], { timeout: 30000 });
    // The worker, with its model.
    const workers = await page.$$eval('#workers tbody tr', (rows) => rows.map((r) => r.cells[1]?.textContent || ''));
    assert.ok(workers.some((m) => m.includes('SmolLM2')), `the dashboard lists the worker: ${workers}`);
    // The chart has points: bars with a value.
    const bars = await page.waitForFunction(
      () => [...document.querySelectorAll('#chart rect.pt')].filter((r) => Number(r.dataset.value) > 0).length || undefined,
      null, { timeout: 30000 });
    const filled = await bars.jsonValue();
    const total = await page.$$eval('#chart rect.pt', (r) => r.length);
    assert.ok(total >= 60, `a point per minute of the hour: ${total}`);
    // The same numbers as the API.
    const status = await json(`${url}/v1/status`);
    const moneyText = await page.$eval('#money', (e) => e.textContent);
    if (role === 'worker') {
      const earned = (status.money.earned / 1e9).toLocaleString('en-US', { maximumFractionDigits: 9 });
      assert.ok(moneyText.includes(earned), `the page shows ${earned} TON earned: ${moneyText}`);
    }
    await page.screenshot({ path: `${out}/dashboard-${name}.png`, fullPage: true });
    // A phone: nothing wider than the screen but the tables' own scroll boxes.
    await page.setViewportSize({ width: 390, height: 844 });
    await sleep(300);
    const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
    assert.ok(overflow <= 0, `the page is ${overflow} px wider than a phone`);
    await page.screenshot({ path: `${out}/dashboard-${name}-phone.png`, fullPage: true });
    // The other spans load too.
    await page.setViewportSize({ width: 1280, height: 900 });
    for (const span of ['day', 'week']) {
      await page.click(`.spans button[data-span="${span}"]`);
      const n = span === 'day' ? 96 : 168;
      await page.waitForFunction((n) => document.querySelectorAll('#chart rect.pt').length >= n, n, { timeout: 10000 });
    }
    assert.deepEqual(problems, [], `the ${name}'s page had problems`);
    console.log(`dashboard on the ${name}: ${JOBS} jobs listed, ${filled} of ${total} chart points filled, no console errors`);
    await page.close();
  }
} finally {
  await browser.close();
}
console.log(`screenshots in ${out}`);
