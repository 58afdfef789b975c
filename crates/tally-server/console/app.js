// Tally console: plain JS, no framework, no third-party asset. It reads the
// API with the token the user signs in with; the token lives in this tab's
// sessionStorage only and is never written into the page.
'use strict';
const $ = (id) => document.getElementById(id);
const KEY = 'tally.token';
const POLL_MS = 10000;
const MAX_POINTS = 1000;
const MAX_SERIES = 8;
const MAX_PAGES = 5;
const MAX_LOG_LINES = 1000;
const INSTANCES_PAGE = 50;
const MAX_EVENTS = 500;
const state = { page: 'usage', admin: false, meters: [], rows: [], quarantineBefore: null,
  instances: { cursors: [null], at: 0, next: null, selected: null, follow: null } };

class ApiError extends Error {
  constructor(status, detail) { super(detail); this.status = status; }
}

async function api(path, opts = {}) {
  const headers = { Authorization: 'Bearer ' + sessionStorage.getItem(KEY), Accept: 'application/json' };
  const res = await fetch(path, { ...opts, headers, cache: 'no-store' });
  const text = await res.text();
  if (!res.ok) {
    let detail = text;
    try { detail = JSON.parse(text).detail || text; } catch (_) { /* not JSON */ }
    throw new ApiError(res.status, detail);
  }
  return (res.headers.get('content-type') || '').includes('json') ? JSON.parse(text) : text;
}

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === 'class') e.className = v; else if (k.startsWith('on')) e.addEventListener(k.slice(2), v); else e.setAttribute(k, v);
  }
  for (const c of children) if (c != null) e.append(c);
  return e;
}
const svgEl = (tag, attrs) => {
  const e = document.createElementNS('http://www.w3.org/2000/svg', tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  return e;
};
function fill(tbody, rows) { tbody.replaceChildren(...rows); }
const td = (text, cls) => el('td', cls ? { class: cls } : {}, String(text ?? ''));
function say(text) { $('status').textContent = text; }
function conditions(m) {
  return ((m.status && m.status.conditions) || []).map((c) => `${c.type}=${c.status}${c.reason ? ' (' + c.reason + ')' : ''}`).join('; ');
}

// ---- sign-in -------------------------------------------------------------
async function signIn(token) {
  sessionStorage.setItem(KEY, token);
  try {
    state.meters = await api('/api/v1/meters');
  } catch (e) {
    sessionStorage.removeItem(KEY);
    say(e.status === 401 ? 'That token is not known to this server.' : 'Sign-in failed: ' + e.message);
    return;
  }
  try { await api('/api/v1/quarantine?limit=1'); state.admin = true; } catch (_) { state.admin = false; }
  $('token').value = '';
  $('signin').hidden = true;
  for (const id of ['nav', 'signout', 'live-label']) $(id).hidden = false;
  $('who').textContent = state.admin ? 'Signed in (admin)' : 'Signed in (project)';
  say('');
  fillMeterChoices();
  show(location.hash.slice(1) || 'usage');
}

function signOut() {
  sessionStorage.removeItem(KEY);
  location.hash = '';
  location.reload();
}

function show(page) {
  if (!$('page-' + page)) page = 'usage';
  state.page = page;
  for (const s of document.querySelectorAll('.page')) s.hidden = s.id !== 'page-' + page;
  for (const b of document.querySelectorAll('nav button')) {
    if (b.dataset.page === page) b.setAttribute('aria-current', 'page'); else b.removeAttribute('aria-current');
  }
  if (location.hash !== '#' + page) history.replaceState(null, '', '#' + page);
  refresh();
}

async function refresh() {
  if (state.page !== 'instances') stopFollowing();
  const run = { usage: loadUsage, catalog: loadCatalog, billing: loadBilling, telemetry: loadTelemetry, instances: loadInstances }[state.page];
  if (!run) return;
  try { await run(); } catch (e) { say(`${state.page}: ${e.message}`); }
}

// ---- usage ---------------------------------------------------------------
function fillMeterChoices() {
  const keep = $('u-meter').value;
  $('u-meter').replaceChildren(...state.meters.map((m) => el('option', { value: m.slug }, m.slug)));
  if (keep) $('u-meter').value = keep;
  fillGroupChoices();
}

function fillGroupChoices() {
  const meter = state.meters.find((m) => m.slug === $('u-meter').value);
  const dims = meter ? Object.keys(meter.groupBy || {}) : [];
  const keep = $('u-group').value;
  $('u-group').replaceChildren(...['', 'subject', 'billing_account', ...dims].map((d) => el('option', { value: d }, d || '(none)')));
  if ([...$('u-group').options].some((o) => o.value === keep)) $('u-group').value = keep;
}

function localInput(date) { return date.toISOString().slice(0, 16); }
function fromInput(value) { return value ? new Date(value + ':00Z') : null; }

const WINDOW_MS = { MINUTE: 6e4, HOUR: 36e5, DAY: 864e5, MONTH: 2592e6 };
function chooseWindow(asked, from, to) {
  const span = to - from;
  const sizes = Object.keys(WINDOW_MS);
  let i = asked === 'auto' ? 0 : sizes.indexOf(asked);
  while (i < sizes.length - 1 && span / WINDOW_MS[sizes[i]] > MAX_POINTS) i += 1;
  return sizes[i];
}

async function loadUsage() {
  const slug = $('u-meter').value;
  if (!slug) { $('u-note').textContent = 'No meters yet.'; return; }
  const to = fromInput($('u-to').value) || new Date(Math.ceil(Date.now() / 36e5) * 36e5);
  const from = fromInput($('u-from').value) || new Date(to - 7 * 864e5);
  const window = chooseWindow($('u-window').value, from, to);
  const q = new URLSearchParams({ from: from.toISOString(), to: to.toISOString(), windowSize: window, windowTimeZone: $('u-tz').value || 'UTC', limit: '10000' });
  const group = $('u-group').value;
  if (group) q.append('groupBy', group);
  for (const part of $('u-filter').value.split(',')) {
    const [k, ...v] = part.split('=');
    if (k.trim() && v.length) q.append(`filterGroupBy[${k.trim()}]`, v.join('=').trim());
  }
  const notes = [`${window.toLowerCase()} windows, aggregated by the server`];
  const rows = group === 'subject' ? await topSubjects(slug, q, notes) : await allRows(slug, q, notes);
  state.rows = rows;
  if (window !== $('u-window').value && $('u-window').value !== 'auto') notes.push(`coarsened to stay under ${MAX_POINTS} points`);
  $('u-note').textContent = '(' + notes.join('; ') + ')';
  drawUsage(rows, group);
}

// Every row, in pages (at most MAX_PAGES of them).
async function allRows(slug, q, notes) {
  let rows = [];
  let answer = { nextCursor: null };
  for (let page = 0; page < MAX_PAGES; page += 1) {
    if (answer.nextCursor) q.set('cursor', answer.nextCursor);
    answer = await api(`/api/v1/meters/${encodeURIComponent(slug)}/query?${q}`);
    rows = rows.concat(answer.data);
    if (!answer.nextCursor) break;
  }
  if (answer.nextCursor) notes.push(`first ${rows.length} rows only`);
  return rows;
}

// By subject: the server ranks every subject and sends the largest ones'
// rows, and the rest merged per window ("other"), however many there are.
async function topSubjects(slug, q, notes) {
  q.delete('limit');
  q.set('top', String(MAX_SERIES - 1));
  const answer = await api(`/api/v1/meters/${encodeURIComponent(slug)}/query?${q}`);
  const shown = new Set(answer.data.map((r) => r.subject)).size;
  if (answer.subjects > shown) {
    notes.push(answer.other ? `the ${shown} largest of ${answer.subjects} subjects, the rest as "other"`
      : `the ${shown} largest of ${answer.subjects} subjects; this aggregation cannot sum up the rest`);
  }
  return answer.data.concat((answer.other || []).map((r) => ({ ...r, subject: 'other' })));
}

const groupOf = (r, group) => (!group ? 'total' : group === 'subject' ? r.subject : (r.groupBy || {})[group]) ?? '(none)';

function drawUsage(rows, group) {
  const total = rows.reduce((s, r) => s + Number(r.value), 0);
  $('u-total').textContent = String(Math.round(total * 1e6) / 1e6);
  const bySeries = new Map();
  for (const r of rows) bySeries.set(groupOf(r, group), (bySeries.get(groupOf(r, group)) || 0) + Number(r.value));
  const ranked = [...bySeries.entries()].sort((a, b) => b[1] - a[1]).map(([k]) => k);
  const shown = new Set(ranked.slice(0, MAX_SERIES - 1));
  const seriesOf = (r) => (ranked.length <= MAX_SERIES || shown.has(groupOf(r, group)) ? groupOf(r, group) : 'other');
  const series = ranked.length <= MAX_SERIES ? ranked : [...shown, 'other'];
  const windows = [...new Set(rows.map((r) => r.windowStart))].sort();
  const stacks = new Map(windows.map((w) => [w, new Map()]));
  for (const r of rows) {
    const s = stacks.get(r.windowStart);
    s.set(seriesOf(r), (s.get(seriesOf(r)) || 0) + Number(r.value));
  }
  drawChart(windows, stacks, series);
  $('u-legend').replaceChildren(...series.map((s, i) => el('span', {}, el('span', { class: `key s${i}`, 'aria-hidden': 'true' }), s)));
  const thead = $('u-table').tHead;
  thead.replaceChildren(el('tr', {}, el('th', {}, 'Window start'), el('th', {}, group || 'Group'), el('th', {}, 'Value')));
  fill($('u-table').tBodies[0], rows.slice(0, 500).map((r) => el('tr', {}, td(r.windowStart), td(groupOf(r, group)), td(r.value, 'num'))));
  const csv = ['windowStart,windowEnd,group,value', ...rows.map((r) => [r.windowStart, r.windowEnd, groupOf(r, group), r.value].map(csvCell).join(','))].join('\r\n');
  const link = $('u-csv');
  if (link.href.startsWith('blob:')) URL.revokeObjectURL(link.href);
  link.href = URL.createObjectURL(new Blob([csv + '\r\n'], { type: 'text/csv' }));
}

function csvCell(v) {
  const s = String(v ?? '');
  return /[",\r\n]/.test(s) ? '"' + s.replace(/"/g, '""') + '"' : s;
}

function drawChart(windows, stacks, series) {
  const svg = $('u-chart');
  const [W, H, pad] = [800, 260, 30];
  svg.replaceChildren(svg.querySelector('title'));
  const max = Math.max(0, ...windows.map((w) => [...stacks.get(w).values()].reduce((a, b) => a + b, 0)));
  svg.append(svgEl('line', { class: 'axis', x1: pad, y1: H - pad, x2: W, y2: H - pad }));
  if (!windows.length || max <= 0) {
    const t = svgEl('text', { x: W / 2, y: H / 2, 'text-anchor': 'middle' });
    t.textContent = 'No usage in this range';
    svg.append(t);
    return;
  }
  const bw = (W - pad) / windows.length;
  windows.forEach((w, i) => {
    let y = H - pad;
    series.forEach((s, j) => {
      const v = stacks.get(w).get(s) || 0;
      if (v <= 0) return;
      const h = (v / max) * (H - 2 * pad);
      y -= h;
      const rect = svgEl('rect', { class: 's' + j, x: pad + i * bw, y, width: Math.max(bw - 1, 0.5), height: h });
      rect.append(svgEl('title', {}));
      rect.firstChild.textContent = `${w} ${s}: ${v}`;
      svg.append(rect);
    });
  });
  for (const [y, label] of [[pad, max], [H - pad, 0]]) {
    const t = svgEl('text', { x: 2, y: y + 4 });
    t.textContent = String(Math.round(label * 100) / 100);
    svg.append(t);
  }
  const first = svgEl('text', { x: pad, y: H - 8 });
  first.textContent = windows[0];
  const last = svgEl('text', { x: W - 4, y: H - 8, 'text-anchor': 'end' });
  last.textContent = windows[windows.length - 1];
  svg.append(first, last);
}

// ---- catalog -------------------------------------------------------------
async function loadCatalog() {
  const list = await api('/apis/meterdefinitions');
  const needle = $('c-search').value.trim().toLowerCase();
  const items = list.items.filter((m) => !needle || m.metadata.name.toLowerCase().includes(needle));
  fill($('c-meters').tBodies[0], items.slice(0, 200).map((m) => {
    const s = m.spec;
    const button = s.phase === 'Draft' || !s.phase
      ? el('button', { type: 'button', onclick: () => validateMeter(m.metadata.name), 'aria-label': 'Validate ' + m.metadata.name }, 'Validate') : null;
    return el('tr', {}, td(m.metadata.name), td(s.phase || 'Draft'), td(s.measurement.unit), td(s.measurement.aggregation),
      td((s.measurement.dimensions || []).join(', ')), el('td', {}, button));
  }));
  $('c-more').textContent = items.length > 200 ? `${items.length} meters match; the first 200 are shown — search to narrow.` : '';
  await loadQuarantine();
}

async function loadQuarantine() {
  if (!state.admin) { $('q-summary').textContent = 'Quarantine is visible to admin tokens only.'; return 0; }
  const page = await api('/api/v1/quarantine?limit=1000');
  const groups = new Map();
  for (const q of page.items) {
    const k = q.meter + '\u0000' + q.reason;
    if (!groups.has(k)) groups.set(k, { meter: q.meter || '(no meter)', reason: q.reason, n: 0, examples: [] });
    const g = groups.get(k);
    g.n += 1;
    if (g.examples.length < 3) g.examples.push(`${q.event.event.id}: ${q.message}`);
  }
  fill($('q-table').tBodies[0], [...groups.values()].map((g) => el('tr', {}, td(g.meter), td(g.reason), td(g.n, 'num'), td(g.examples.join(' · ')))));
  const n = page.items.length + (page.nextCursor ? '+' : '');
  $('q-summary').textContent = `${n} events quarantined`;
  if (state.quarantineBefore === null) state.quarantineBefore = page.items.length;
  return page.items.length;
}

async function recheck() {
  const before = state.quarantineBefore ?? 0;
  try {
    const now = await loadQuarantine();
    state.quarantineBefore = now;
    $('q-summary').textContent += ` (re-checked: ${Math.max(before - now, 0)} measured since the last look)`;
  } catch (e) { say('quarantine: ' + e.message); }
}

async function validateMeter(name) {
  const box = $('cv-body');
  $('c-validation').hidden = false;
  box.replaceChildren(el('p', {}, `Validating ${name}…`));
  try {
    const r = await api(`/api/v1/meters/${encodeURIComponent(name)}/validate`);
    const v = r.values || {};
    const verdict = el('p', { class: r.verdict.safeToPublish ? 'ok' : 'bad', id: 'cv-verdict' },
      `${name}: ${r.verdict.safeToPublish ? 'safe to publish' : 'NOT safe to publish'}`);
    const rows = [
      ['Events seen', `${r.eventsSeen}${r.capReached ? ' (cap reached)' : ''}`],
      ['Values', `count ${v.count ?? '-'}, min ${v.min ?? '-'}, p50 ${v.p50 ?? '-'}, p99 ${v.p99 ?? '-'}, max ${v.max ?? '-'}, zeros ${v.zeros ?? '-'}, non-numeric ${v.nonNumeric ?? '-'}`],
      ...r.dimensions.map((d) => [`Dimension ${d.name}`, `${d.cardinality} distinct; top ${d.top.map((t) => `${t.name}×${t.events}`).join(', ')}`]),
      ['Undeclared dimensions', r.undeclaredDimensions.map((c) => `${c.name}×${c.events}`).join(', ')],
      ['Required labels missing', r.missingLabels.map((c) => `${c.name}×${c.events}`).join(', ')],
      ['Would quarantine', r.wouldQuarantine.map((q) => `${q.reason}×${q.events}`).join(', ')],
      ['Unit warnings', r.unitWarnings.join('; ')],
    ];
    const table = el('table', {}, el('caption', {}, 'Figures'), el('tbody', {}, ...rows.map(([k, x]) => el('tr', {}, el('th', { scope: 'row' }, k), td(x)))));
    const list = el('ul', {}, ...r.verdict.reasons.map((x) => el('li', { class: 'bad' }, x)), ...r.verdict.warnings.map((x) => el('li', {}, x)));
    box.replaceChildren(verdict, list, table);
  } catch (e) {
    box.replaceChildren(el('p', { class: 'bad' }, e.status === 403 ? 'Validation needs an admin token.' : e.message));
  }
}

// ---- billing -------------------------------------------------------------
const seconds = (lag) => (lag == null ? '' : typeof lag === 'object' ? `${lag.secs}s` : `${lag}s`);

async function loadBilling() {
  let status;
  try { status = await api('/api/v1/billing/status'); } catch (e) {
    const why = e.status === 501 ? 'Billing forwarding is not running in this server.' : e.status === 403 ? 'Billing is visible to admin tokens only.' : e.message;
    fill($('b-table').tBodies[0], [el('tr', {}, el('td', { colspan: '7' }, why))]);
    return;
  }
  const rows = [];
  for (const s of status.sinks) {
    const meters = (s.status && s.status.meters) || [];
    if (!meters.length) rows.push(el('tr', {}, td(s.sink), td(s.ready ? 'yes' : `no (${s.reason})`), td(''), td(''), td(''), td(s.status ? s.status.deadLetters : ''), td(s.lastPass)));
    for (const m of meters) {
      rows.push(el('tr', {}, td(s.sink), td(s.ready ? 'yes' : `no (${s.reason})`), td(m.meter), td(seconds(m.lag)), td(m.recordsSent, 'num'), td(m.recordsDeadLettered, 'num'), td(s.lastPass)));
    }
  }
  fill($('b-table').tBodies[0], rows.length ? rows : [el('tr', {}, el('td', { colspan: '7' }, 'No billing sinks.'))]);
}

async function reconcile() {
  const to = new Date(Math.floor(Date.now() / 36e5) * 36e5);
  const from = new Date(to - 864e5);
  try {
    const r = await api(`/api/v1/billing/reconcile?from=${from.toISOString()}&to=${to.toISOString()}`);
    $('b-recon').textContent = JSON.stringify(r, null, 2);
  } catch (e) { $('b-recon').textContent = e.message; }
}

// ---- telemetry -----------------------------------------------------------
async function loadTelemetry() {
  const exporters = await api('/apis/exporters');
  fill($('t-exporters').tBodies[0], exporters.items.map((x) => el('tr', {}, td(x.metadata.namespace), td(x.metadata.name), td(((x.spec && x.spec.sinks) || []).map((s) => s.name || s.type).join(', ')), td(conditions(x)))));
  if (state.admin) {
    const text = await api('/metrics');
    const comps = new Map();
    for (const line of String(text).split('\n')) {
      const m = /^tally_component_(sent_total|dropped_total|queue_depth)\{component_kind="([^"]*)",component_id="((?:[^"\\]|\\.)*)"[^}]*\} (\S+)/.exec(line);
      if (!m) continue;
      const c = comps.get(m[3]) || { kind: m[2], sent_total: 0, dropped_total: 0, queue_depth: 0 };
      c[m[1]] += Number(m[4]);
      comps.set(m[3], c);
    }
    fill($('t-components').tBodies[0], [...comps.entries()].map(([id, c]) => el('tr', {}, td(id), td(c.kind), td(c.sent_total, 'num'), td(c.dropped_total, 'num'), td(c.queue_depth, 'num'))));
  } else {
    fill($('t-components').tBodies[0], [el('tr', {}, el('td', { colspan: '5' }, 'Component counters are visible to admin tokens only.'))]);
  }
  try {
    const policies = await api('/apis/telemetrypolicies');
    fill($('t-policies').tBodies[0], policies.items.map((p) => el('tr', {}, td(p.metadata.namespace), td(p.metadata.name), td(conditions(p)))));
  } catch (e) {
    fill($('t-policies').tBodies[0], [el('tr', {}, el('td', { colspan: '3' }, `Not available: ${e.message}`))]);
  }
}

// ---- instances -----------------------------------------------------------
// A page of instances (cursor paging), one instance's lifecycle events, and
// its logs: a bounded read, or a follow (NDJSON) that appends as lines are
// stored, keeping at most MAX_LOG_LINES in the DOM.
const ist = state.instances;
const instancePath = (project, instance) => `/api/v1/projects/${encodeURIComponent(project)}/instances/${encodeURIComponent(instance)}`;
const whyNot = (e, what) => (e.status === 501 || e.status === 404 && /keeps no/.test(e.message) ? `This server keeps no ${what}.` : e.message);

async function loadInstances() {
  const q = new URLSearchParams({ limit: String(INSTANCES_PAGE) });
  if (ist.cursors[ist.at]) q.set('cursor', ist.cursors[ist.at]);
  let page;
  try { page = await api('/api/v1/instances?' + q); } catch (e) {
    fill($('i-table').tBodies[0], [el('tr', {}, el('td', { colspan: '8', class: 'bad' }, whyNot(e, 'compute instances')))]);
    return;
  }
  ist.next = page.nextCursor || null;
  $('i-prev').disabled = ist.at === 0;
  $('i-next').disabled = !ist.next;
  $('i-note').textContent = `page ${ist.at + 1}${ist.next ? '' : ' (last)'}`;
  fill($('i-table').tBodies[0], page.items.length ? page.items.map(instanceRow) : [el('tr', {}, el('td', { colspan: '8' }, 'No instances with lifecycle events yet.'))]);
  if (ist.selected) await loadEvents();
  if (ist.selected && !ist.follow) await loadLogs();
}

function instanceRow(i) {
  const show = el('button', { type: 'button', 'aria-label': `Show ${i.project}/${i.instance}`, onclick: () => selectInstance(i.project, i.instance) }, 'Show');
  return el('tr', {}, td(i.project), td(i.instance), td(i.reason ? `${i.state} (${i.reason})` : i.state, i.state === 'crashed' || i.state === 'oom_killed' ? 'bad' : ''),
    td(i.since), td(i.events, 'num'), td(i.workload), td(i.node), el('td', {}, show));
}

function turnPage(d) {
  if (d > 0 && ist.next) { ist.cursors[ist.at + 1] = ist.next; ist.at += 1; }
  if (d < 0 && ist.at > 0) ist.at -= 1;
  refresh();
}

async function selectInstance(project, instance) {
  stopFollowing();
  ist.selected = { project, instance };
  $('i-detail').hidden = false;
  $('i-detail-h').textContent = `${project}/${instance}`;
  $('i-logs').replaceChildren();
  try { await loadEvents(); await showLogs(); } catch (e) { say('instances: ' + e.message); }
}

// Lifecycle events in arrival order, in pages, at most MAX_EVENTS of them.
async function loadEvents() {
  const { project, instance } = ist.selected;
  let items = [];
  let cursor = null;
  try {
    do {
      const q = new URLSearchParams({ project, limit: '100' });
      if (cursor) q.set('cursor', cursor);
      const page = await api(`/api/v1/instances/${encodeURIComponent(instance)}/events?${q}`);
      items = items.concat(page.items);
      cursor = page.nextCursor;
    } while (cursor && items.length < MAX_EVENTS);
  } catch (e) {
    fill($('i-events').tBodies[0], [el('tr', {}, el('td', { colspan: '5', class: 'bad' }, whyNot(e, 'compute instances')))]);
    return;
  }
  fill($('i-events').tBodies[0], items.map((v) => el('tr', {}, td(v.time), td(v.kind), td(v.reason), td(v.node), td(v.message))));
  $('i-events-note').textContent = cursor ? `the first ${items.length} events only` : '';
}

function logQuery() {
  const q = new URLSearchParams({ since: $('i-since').value.trim() || '1h', limit: String(MAX_LOG_LINES) });
  if ($('i-stream').value) q.set('stream', $('i-stream').value);
  if ($('i-grep').value) q.set('grep', $('i-grep').value);
  return q;
}

function logNote(text, bad) {
  $('i-logs-note').textContent = text;
  $('i-logs-note').className = bad ? 'bad' : 'hint';
}

async function showLogs() {
  stopFollowing();
  if (!ist.selected) return;
  if ($('i-follow').checked) follow(); else await loadLogs();
}

async function loadLogs() {
  const { project, instance } = ist.selected;
  // No stale lines under a new filter while the answer is on its way.
  $('i-logs').replaceChildren();
  logNote('Loading…');
  let page;
  try { page = await api(`${instancePath(project, instance)}/logs?${logQuery()}`); } catch (e) {
    logNote(whyNot(e, 'instance logs'), true);
    return;
  }
  appendLines(page.lines);
  logNote(`${page.lines.length} lines${page.truncated ? ' (the read stopped at its budget: narrow the range)' : ''}`);
}

function appendLines(lines) {
  const list = $('i-logs');
  const atEnd = list.scrollTop + list.clientHeight >= list.scrollHeight - 4;
  list.append(...lines.map((l) => el('li', { class: l.stream }, el('time', {}, l.time), el('span', { class: 'stream' }, l.stream), l.line)));
  while (list.childElementCount > MAX_LOG_LINES) list.firstElementChild.remove();
  if (atEnd) list.scrollTop = list.scrollHeight;
}

// Follow: the server sends the recent lines, then each new one as it is
// stored (an empty line now and then keeps the connection alive).
async function follow() {
  const { project, instance } = ist.selected;
  const abort = new AbortController();
  ist.follow = abort;
  $('i-logs').replaceChildren();
  logNote('Connecting…');
  try {
    const headers = { Authorization: 'Bearer ' + sessionStorage.getItem(KEY), Accept: 'application/x-ndjson' };
    const res = await fetch(`${instancePath(project, instance)}/logs?${logQuery()}&follow=true`, { headers, cache: 'no-store', signal: abort.signal });
    if (!res.ok) {
      let detail = await res.text();
      try { detail = JSON.parse(detail).detail || detail; } catch (_) { /* not JSON */ }
      throw new ApiError(res.status, detail);
    }
    logNote('Following: new lines appear as they are stored.');
    const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
    let rest = '';
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      const parts = (rest + value).split('\n');
      rest = parts.pop();
      if (rest.length > 1 << 20) throw new Error('a log line over 1 MiB: stopped following');
      appendLines(parts.filter((p) => p.trim()).map((p) => JSON.parse(p)));
    }
    if (ist.follow === abort) logNote('The server ended the follow.', true);
  } catch (e) {
    if (abort.signal.aborted) return;
    logNote(e.status === 429 ? 'Too many log followers on this server; try again shortly.' : whyNot(e, 'instance logs'), true);
  } finally {
    if (ist.follow === abort) { ist.follow = null; $('i-follow').checked = false; }
  }
}

function stopFollowing() {
  if (!ist.follow) return;
  const abort = ist.follow;
  ist.follow = null;
  abort.abort();
  logNote('Stopped following.');
}

// ---- wiring --------------------------------------------------------------
document.addEventListener('DOMContentLoaded', () => {
  const to = new Date(Math.ceil(Date.now() / 36e5) * 36e5);
  $('u-to').value = localInput(to);
  $('u-from').value = localInput(new Date(to - 7 * 864e5));
  $('signin-form').addEventListener('submit', (e) => { e.preventDefault(); signIn($('token').value); });
  $('signout').addEventListener('click', signOut);
  $('usage-form').addEventListener('submit', (e) => { e.preventDefault(); refresh(); });
  $('u-meter').addEventListener('change', fillGroupChoices);
  $('c-search').addEventListener('input', () => refresh());
  $('q-recheck').addEventListener('click', recheck);
  $('b-reconcile').addEventListener('click', reconcile);
  $('i-prev').addEventListener('click', () => turnPage(-1));
  $('i-next').addEventListener('click', () => turnPage(1));
  $('i-logs-form').addEventListener('submit', (e) => { e.preventDefault(); showLogs(); });
  $('i-follow').addEventListener('change', showLogs);
  const nav = [...document.querySelectorAll('nav button')];
  nav.forEach((b, i) => {
    b.addEventListener('click', () => show(b.dataset.page));
    b.addEventListener('keydown', (e) => {
      const d = e.key === 'ArrowRight' ? 1 : e.key === 'ArrowLeft' ? -1 : 0;
      if (d) { const n = nav[(i + d + nav.length) % nav.length]; n.focus(); show(n.dataset.page); }
    });
  });
  setInterval(() => { if (!$('live').checked || $('signin').hidden === false || document.hidden) return; refresh(); }, POLL_MS);
  if (sessionStorage.getItem(KEY)) signIn(sessionStorage.getItem(KEY)); else $('token').focus();
});
