// The silk node's dashboard: polls GET /v1/status and draws it.
// Every value from the node (and so from peers' gossip) goes into the page
// as text (textContent, never innerHTML): a hostile peer's model name is
// shown, not run.
'use strict';

const POLL_MS = 2000;
const KEY_ITEM = 'silk-api-key';
const SVG = 'http://www.w3.org/2000/svg';
let span = 'hour';
let timer = null;

const $ = (id) => document.getElementById(id);

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function ton(nano) {
  if (nano === null || nano === undefined) return '–';
  const n = typeof nano === 'string' ? Number(nano) : nano;
  return (n / 1e9).toLocaleString(undefined, { maximumFractionDigits: 9 });
}

function short(id) {
  return id && id.length > 16 ? id.slice(0, 8) + '…' + id.slice(-6) : (id || '–');
}

// `name@sha256:<64 hex>` as `name@sha256:<first 8>…`; the whole id is in
// the cell's title.
function model(id) {
  const at = (id || '').indexOf('@sha256:');
  return at < 0 ? (id || '–') : id.slice(0, at + 16) + '…';
}

function duration(s) {
  const d = Math.floor(s / 86400), h = Math.floor(s / 3600) % 24, m = Math.floor(s / 60) % 60;
  return (d ? d + 'd ' : '') + (d || h ? h + 'h ' : '') + m + 'm ' + (s % 60) + 's';
}

function fixed(x, digits) {
  return x === null || x === undefined ? '–' : Number(x).toFixed(digits);
}

function fill(dl, pairs) {
  dl.replaceChildren();
  for (const [k, v, cls] of pairs) {
    dl.append(el('dt', k), el('dd', v, cls));
  }
}

function rows(table, list, cells) {
  const body = table.tBodies[0];
  body.replaceChildren();
  if (!list.length) {
    const tr = el('tr');
    const td = el('td', 'none yet', 'muted');
    td.colSpan = table.tHead.rows[0].cells.length;
    tr.append(td);
    body.append(tr);
    return;
  }
  for (const item of list) {
    const tr = el('tr');
    for (const [text, cls, title] of cells(item)) {
      const td = el('td', text, cls);
      if (title) td.title = title;
      tr.append(td);
    }
    body.append(tr);
  }
}

function headers() {
  const key = sessionStorage.getItem(KEY_ITEM);
  return key ? { Authorization: 'Bearer ' + key } : {};
}

function askKey(message) {
  $('main').hidden = true;
  $('key').hidden = false;
  $('key-error').textContent = message || '';
  $('live').textContent = 'needs an API key';
}

async function poll() {
  clearTimeout(timer);
  try {
    const r = await fetch('/v1/status?jobs=20&span=' + span, { headers: headers(), cache: 'no-store' });
    if (r.status === 401) {
      const body = await r.json().catch(() => ({}));
      const had = sessionStorage.getItem(KEY_ITEM);
      sessionStorage.removeItem(KEY_ITEM);
      askKey(had ? (body.error && body.error.message) || 'that key was refused' : '');
      return;
    }
    if (!r.ok) throw new Error('HTTP ' + r.status);
    draw(await r.json());
    $('live').textContent = 'live · updated ' + new Date().toLocaleTimeString();
    $('live').className = 'muted';
  } catch (e) {
    $('live').textContent = 'cannot reach the node (' + e.message + '); retrying';
    $('live').className = 'bad';
  }
  timer = setTimeout(poll, POLL_MS);
}

let last = null;

function draw(s) {
  last = s;
  $('key').hidden = true;
  $('main').hidden = false;
  const n = s.node;
  $('peer').textContent = short(n.peer_id);
  $('peer').title = n.peer_id;
  const node = [
    ['peer id', n.peer_id, 'mono'],
    ['version', n.version],
    ['uptime', duration(n.uptime_s)],
    ['attestation', n.attestation_words, n.attestation === 'tdx' ? 'ok' : 'bad'],
    ['serving', n.worker ? model(n.worker.model) : 'nothing (gateway only)'],
  ];
  if (n.wallet) node.push(['wallet', n.wallet, 'mono']);
  if (n.contract) node.push(['contract', n.contract, 'mono']);
  fill($('node'), node);

  const money = [];
  if (s.balances) {
    if (s.balances.error) {
      money.push(['balances', 'unavailable: ' + s.balances.error, 'bad']);
    } else {
      money.push(['wallet balance', ton(s.balances.wallet_nanoton) + ' TON']);
      money.push(['contract balance', ton(s.balances.contract_nanoton) + ' TON']);
      money.push(['in open lanes', ton(s.balances.committed_nanoton) + ' TON']);
    }
  }
  if (s.money) {
    money.push(['earned', ton(s.money.earned) + ' TON', 'ok']);
    money.push(['redeemed', ton(s.money.redeemed) + ' TON']);
    money.push(['spent', ton(s.money.charged) + ' TON']);
    money.push(['reserved now', ton(s.money.reserved) + ' TON']);
  }
  if (!money.length) money.push(['payments', 'off on this node']);
  fill($('money'), money);

  const e = s.engine;
  fill($('engine'), e ? [
    ['batch in use', e.batch_in_use + ' of ' + e.batch_size],
    ['queued', e.queued],
    ['decode', fixed(e.decode_tokens_per_s, 1) + ' tok/s'],
    ['prefix cache', fixed(e.prefix_cache_bytes / 1048576, 1) + ' MiB, ' + e.cached_prompt_tokens + ' prompt tokens reused'],
    ['gateway queue', s.gateway_queue],
  ] : [['engine', 'none (gateway only)'], ['gateway queue', s.gateway_queue]]);

  const jobs = [];
  for (const role of ['gateway', 'worker']) {
    const counts = s.jobs[role];
    const parts = Object.keys(counts).map((k) => k + ' ' + counts[k]);
    jobs.push([role === 'gateway' ? 'sent as gateway' : 'served as worker', parts.length ? parts.join(', ') : 'none']);
  }
  fill($('jobs'), jobs);

  chart(s.series, Boolean(s.money));

  rows($('recent'), s.recent_jobs, (j) => [
    [new Date(j.at_ms).toLocaleTimeString()],
    [j.role],
    [model(j.model), '', j.model],
    [short(j.peer), 'mono', j.peer],
    [j.prompt_tokens + ' + ' + j.completion_tokens, 'num'],
    [j.first_token_ms === null ? '–' : j.first_token_ms + ' ms', 'num'],
    [fixed(j.tokens_per_s, 1), 'num'],
    [j.cost_nanoton === null ? '–' : ton(j.cost_nanoton), 'num'],
    [j.outcome, j.outcome === 'ok' ? 'ok' : 'bad'],
  ]);

  const m = s.mesh;
  rows($('workers'), m.workers, (w) => [
    [short(w.peer_id) + (w.local ? ' (this node)' : ''), 'mono', w.peer_id],
    [(w.models || []).map(model).join(', '), '', (w.models || []).join(', ')],
    [w.free_slots + ' free, ' + w.queue_depth + ' queued', 'num'],
    [fixed(w.decode_tokens_per_s, 1), 'num'],
    [fixed(w.price_coefficient_milli / 1000, 3), 'num'],
    [fixed(w.reputation, 2), 'num'],
    [w.attestation, w.attestation === 'tdx' ? 'ok' : 'bad'],
    [w.rtt_ms !== null ? fixed(w.rtt_ms, 1) : (w.estimated_rtt_ms !== null ? '≈' + fixed(w.estimated_rtt_ms, 1) : '–'), 'num'],
  ]);
  rows($('peers'), m.peers, (p) => [
    [short(p.peer_id), 'mono', p.peer_id],
    [fixed(p.rtt_ms, 2), 'num'],
    [p.agent_version || '–'],
    [(p.addresses || [])[0] || '–', 'mono'],
  ]);
}

function chart(series, paid) {
  const svg = $('chart');
  svg.replaceChildren();
  const pts = series.points;
  // Drawn at the element's own size, so text is not stretched.
  const W = Math.max(svg.clientWidth, 200), H = 200, top = 14;
  svg.setAttribute('viewBox', `0 0 ${W} 220`);
  const keys = paid ? ['earned_nanoton', 'charged_nanoton'] : ['jobs'];
  const classes = paid ? ['earned', 'charged'] : ['jobs'];
  const names = paid ? ['earned (TON)', 'spent (TON)'] : ['jobs'];
  $('chart-title').textContent = paid ? 'Earnings and spending' : 'Jobs';
  const legend = $('legend');
  legend.replaceChildren();
  classes.forEach((c, i) => {
    const item = el('span', names[i]);
    const sw = el('i');
    sw.style.background = getComputedStyle(document.documentElement).getPropertyValue(c === 'earned' ? '--earn' : c === 'charged' ? '--spend' : '--jobs');
    item.prepend(sw);
    legend.append(item);
  });
  let max = 0;
  for (const p of pts) for (const k of keys) max = Math.max(max, Number(p[k]) || 0);
  for (const f of [0.5, 1]) {
    const y = H - (H - top) * f;
    const line = document.createElementNS(SVG, 'line');
    line.setAttribute('class', 'grid');
    line.setAttribute('x1', 0); line.setAttribute('x2', W);
    line.setAttribute('y1', y); line.setAttribute('y2', y);
    svg.append(line);
    const label = document.createElementNS(SVG, 'text');
    label.setAttribute('x', 2); label.setAttribute('y', y - 2);
    label.textContent = max ? (paid ? ton(max * f) : (max * f).toFixed(max * f < 10 ? 1 : 0)) : '';
    svg.append(label);
  }
  const slot = W / Math.max(pts.length, 1);
  const bar = Math.max(slot / keys.length - 1, 1);
  pts.forEach((p, i) => {
    keys.forEach((k, j) => {
      const v = Number(p[k]) || 0;
      const h = max ? (H - top) * v / max : 0;
      const r = document.createElementNS(SVG, 'rect');
      r.setAttribute('class', 'pt ' + classes[j]);
      r.setAttribute('x', i * slot + j * bar);
      r.setAttribute('y', H - h);
      r.setAttribute('width', bar);
      r.setAttribute('height', h);
      r.dataset.value = String(v);
      const title = document.createElementNS(SVG, 'title');
      title.textContent = new Date(p.start_ms).toLocaleString() + ': ' + names[j] + ' ' + (paid ? ton(v) : v);
      r.append(title);
      svg.append(r);
    });
  });
  const axis = $('chart-axis');
  axis.replaceChildren();
  if (pts.length) {
    axis.append(el('span', new Date(pts[0].start_ms).toLocaleString()),
      el('span', 'one bar per ' + (series.step_s >= 3600 ? series.step_s / 3600 + ' h' : series.step_s / 60 + ' min')),
      el('span', 'now'));
  }
}

document.addEventListener('DOMContentLoaded', () => {
  $('key-save').addEventListener('click', () => {
    const v = $('key-input').value.trim();
    if (!v) return;
    sessionStorage.setItem(KEY_ITEM, v);
    $('key-input').value = '';
    poll();
  });
  $('key-input').addEventListener('keydown', (e) => { if (e.key === 'Enter') $('key-save').click(); });
  for (const b of document.querySelectorAll('.spans button')) {
    b.addEventListener('click', () => {
      span = b.dataset.span;
      for (const o of document.querySelectorAll('.spans button')) o.classList.toggle('on', o === b);
      poll();
    });
  }
  let resized = null;
  window.addEventListener('resize', () => {
    clearTimeout(resized);
    resized = setTimeout(() => { if (last) chart(last.series, Boolean(last.money)); }, 150);
  });
  poll();
});
