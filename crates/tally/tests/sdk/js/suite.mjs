// OpenMeter's official JS SDK (@openmeter/sdk, unmodified) against a
// running `tally serve`: every call of the events, meters and subjects
// families. Every answer is recorded and validated against the server's
// /openapi.json (the response schema of its route and status).
//
// usage: node suite.mjs BASE_URL TOKEN
// Prints one line per check and exits 1 on the first failure.
import assert from 'node:assert/strict'
import { OpenMeter } from '@openmeter/sdk'
import Ajv2020 from 'ajv/dist/2020.js'
import addFormats from 'ajv-formats'

const [base, token] = process.argv.slice(2)
const recorded = []
const recordingFetch = async (input, init) => {
  const response = await fetch(input, init)
  const request = input instanceof Request ? input : new Request(input, init)
  const text = await response.clone().text()
  recorded.push({
    method: request.method,
    path: new URL(request.url).pathname,
    status: response.status,
    contentType: response.headers.get('content-type') ?? '',
    body: text,
  })
  return response
}
const om = new OpenMeter({ baseUrl: base, apiKey: token, fetch: recordingFetch })

async function check(name, f) {
  try {
    await f()
    console.log(`ok ${name}`)
  } catch (e) {
    console.log(`FAILED ${name}: ${e?.stack ?? e}`)
    if (e?.problem) console.log(JSON.stringify(e.problem))
    process.exit(1)
  }
}

async function refused(promise, status) {
  try {
    await promise
  } catch (e) {
    assert.equal(e.status ?? e.response?.status, status, `expected ${status}: ${e}`)
    return e
  }
  assert.fail(`expected HTTP ${status}`)
}

const now = new Date()
const minute = 60_000
// Events a few minutes ago, at odd milliseconds.
const t0 = new Date(Math.floor(now.getTime() / minute) * minute - 10 * minute + 1234)
const at = (ms) => new Date(t0.getTime() + ms)

await check('meters.create', async () => {
  const m = await om.meters.create({
    slug: 'sdk_tokens',
    name: 'SDK tokens',
    description: 'tokens by model',
    aggregation: 'SUM',
    eventType: 'sdk.prompt',
    valueProperty: '$.tokens',
    groupBy: { model: '$.model' },
  })
  assert.equal(m.slug, 'sdk_tokens')
  assert.equal(m.name, 'SDK tokens')
  assert.equal(m.description, 'tokens by model')
  assert.ok(m.id && m.createdAt instanceof Date && m.updatedAt instanceof Date)
})

await check('events.ingest (single)', async () => {
  const r = await om.events.ingest({
    id: 'js-1', source: 'sdk-suite', type: 'sdk.prompt', subject: 'customer-1',
    time: at(0), data: { tokens: 10, model: 'small' },
  })
  assert.equal(r, undefined) // 204, no body
  const last = recorded.at(-1)
  assert.equal(last.status, 204)
})

await check('events.ingest (batch, SDK defaults for id/source/time)', async () => {
  await om.events.ingest([
    { id: 'js-2', source: 'sdk-suite', type: 'sdk.prompt', subject: 'customer-1', time: at(30_000), data: { tokens: 5, model: 'large' } },
    { id: 'js-3', source: 'sdk-suite', type: 'sdk.prompt', subject: 'customer-2', time: at(2 * minute + 500), data: { tokens: 7, model: 'small' } },
    { type: 'sdk.prompt', subject: 'customer-2', data: { tokens: 1, model: 'small' } },
  ])
  assert.equal(recorded.at(-1).status, 204)
})

await check('events.ingest refuses a bad event with problem+json', async () => {
  const e = await refused(om.events.ingest({ id: 'bad', source: 's', type: 'sdk.prompt', subject: '', data: {} }), 400)
  assert.match(recorded.at(-1).contentType, /application\/problem\+json/)
})

await check('events.list (v1: array, ingestedAt/storedAt, filters)', async () => {
  const all = await om.events.list({ subject: 'customer-1' })
  assert.ok(Array.isArray(all))
  assert.equal(all.length, 2)
  for (const e of all) {
    assert.ok(e.ingestedAt instanceof Date && e.storedAt instanceof Date)
    assert.equal(e.event.subject, 'customer-1')
  }
  const byId = await om.events.list({ id: 'js-2' })
  assert.deepEqual(byId.map((e) => e.event.id), ['js-2'])
  const stored = all[0].ingestedAt
  const none = await om.events.list({ ingestedAtTo: new Date(stored.getTime() - 3_600_000) })
  assert.equal(none.length, 0)
  const some = await om.events.list({ ingestedAtFrom: new Date(stored.getTime() - 3_600_000), ingestedAtTo: new Date(Date.now() + 60_000) })
  assert.ok(some.length >= 4)
  const window = await om.events.list({ from: at(0), to: at(1) })
  assert.deepEqual(window.map((e) => e.event.id), ['js-1'])
  await refused(om.events.list({ from: at(1), to: at(0) }), 400)
  await refused(om.events.list({ customerId: ['c'] }), 400)
})

await check('events.listV2 (pages, filter)', async () => {
  const first = await om.events.listV2({ limit: 2 })
  assert.equal(first.items.length, 2)
  assert.ok(first.nextCursor)
  const rest = await om.events.listV2({ limit: 100, cursor: first.nextCursor })
  assert.equal(first.items.length + rest.items.length, 4)
  assert.ok(rest.items.every((e) => e.ingestedAt instanceof Date && e.storedAt instanceof Date))
  // The SDK types `filter` as a string and cannot serialise the deep
  // object OpenMeter documents: send it by hand.
  const get = (q) => recordingFetch(`${base}/api/v2/events?${q}`, { headers: { authorization: `Bearer ${token}` } })
  const filtered = await (await get('filter[subject][eq]=customer-2')).json()
  assert.equal(filtered.items.length, 2)
  assert.equal((await get('filter[subject][like]=c%25')).status, 400)
})

let meterId
await check('meters.list and meters.get by slug and by id', async () => {
  const list = await om.meters.list()
  const m = list.find((m) => m.slug === 'sdk_tokens')
  assert.ok(m)
  meterId = m.id
  const bySlug = await om.meters.get('sdk_tokens')
  const byId = await om.meters.get(meterId)
  assert.deepEqual(byId, bySlug)
  await refused(om.meters.get('no-such-meter'), 404)
})

await check('meters.update keeps createdAt, moves updatedAt', async () => {
  const before = await om.meters.get('sdk_tokens')
  await new Promise((r) => setTimeout(r, 5))
  const m = await om.meters.update(meterId, {
    name: 'SDK tokens (renamed)',
    description: 'tokens by model and tier',
    groupBy: { model: '$.model', tier: '$.tier' },
  })
  assert.equal(m.name, 'SDK tokens (renamed)')
  assert.equal(m.description, 'tokens by model and tier')
  assert.deepEqual(Object.keys(m.groupBy).sort(), ['model', 'tier'])
  assert.equal(m.createdAt.getTime(), before.createdAt.getTime())
  assert.ok(m.updatedAt > before.updatedAt)
  const again = await om.meters.get('sdk_tokens')
  assert.equal(again.description, 'tokens by model and tier')
})

// The meter was changed, so it is rebuilt from the log: wait for it.
async function ready(f) {
  for (let i = 0; i < 200; i++) {
    try {
      return await f()
    } catch (e) {
      if ((e.status ?? e.response?.status) !== 503) throw e
      await new Promise((r) => setTimeout(r, 50))
    }
  }
  return f()
}

await check('meters.query (GET) with any precision, group-by, subjects', async () => {
  // The SDK passes Date objects with milliseconds: answered exactly.
  const all = await ready(() => om.meters.query('sdk_tokens', { from: t0, to: new Date(Date.now() + minute) }))
  assert.equal(all.data.length, 1)
  assert.equal(all.data[0].value, 23)
  // From just after js-1 (at t0): js-1 is out, the others in.
  const partial = await om.meters.query('sdk_tokens', { from: at(1), to: at(2 * minute + 501) })
  assert.equal(partial.data[0].value, 12)
  const byModel = await om.meters.query(meterId, { from: t0, windowSize: 'MINUTE', groupBy: ['model'], subject: ['customer-1', 'customer-2'] })
  const sum = (rows) => rows.reduce((a, r) => a + r.value, 0)
  // `to` defaults to now: the event the SDK dated now counts too.
  assert.equal(sum(byModel.data), 23)
  assert.ok(byModel.data.every((r) => ['customer-1', 'customer-2'].includes(r.subject)))
  const small = await om.meters.query('sdk_tokens', { from: t0, filterGroupBy: { model: 'small' } })
  assert.equal(small.data[0].value, 18)
  await refused(om.meters.query('sdk_tokens', { filterCustomerId: ['c'] }), 400)
})

await check('meters.queryPost', async () => {
  const r = await om.meters.queryPost('sdk_tokens', {
    from: t0, to: new Date(Date.now() + minute), groupBy: ['subject'], windowSize: 'HOUR', windowTimeZone: 'Asia/Kolkata',
  })
  const bySubject = Object.fromEntries(r.data.map((row) => [row.subject, 0]))
  for (const row of r.data) bySubject[row.subject] += row.value
  assert.deepEqual(bySubject, { 'customer-1': 15, 'customer-2': 8 })
  const filtered = await om.meters.queryPost('sdk_tokens', { from: t0, filterGroupBy: { model: ['large'] } })
  assert.equal(filtered.data[0].value, 5)
  await refused(om.meters.queryPost('sdk_tokens', { filterGroupBy: { model: ['small', 'large'] } }), 400)
})

await check('meters.listGroupByValues', async () => {
  const values = await om.meters.listGroupByValues('sdk_tokens', 'model', { from: t0 })
  assert.deepEqual(values, ['large', 'small'])
})

await check('subjects.list and subjects.get', async () => {
  const subjects = await om.subjects.list()
  assert.deepEqual(subjects.map((s) => s.key), ['customer-1', 'customer-2'])
  assert.ok(subjects.every((s) => s.createdAt instanceof Date && s.updatedAt instanceof Date))
  const one = await om.subjects.get('customer-2')
  assert.equal(one.key, 'customer-2')
  await refused(om.subjects.get('nobody'), 404)
})

await check('subjects.upsert and delete: 501 naming the feature', async () => {
  await refused(om.subjects.upsert({ key: 'x' }), 501)
  assert.match(recorded.at(-1).body, /subject management/)
  await refused(om.subjects.delete('customer-1'), 501)
})

await check('features beyond metering: 501 problem+json naming them', async () => {
  for (const [call, feature] of [
    [() => om.entitlements.list(), 'entitlements'],
    [() => om.features.list(), 'features'],
    [() => om.plans.list(), 'plans'],
    [() => om.customers.list(), 'customers'],
    [() => om.billing.invoices.list(), 'invoices'],
    [() => om.notifications.channels.list(), 'notifications'],
    [() => om.apps.list(), 'apps'],
    [() => om.subscriptions.get('s1'), 'subscriptions'],
    [() => om.addons.list(), 'add-ons'],
  ]) {
    await refused(call(), 501)
    const last = recorded.at(-1)
    assert.match(last.contentType, /application\/problem\+json/)
    assert.match(JSON.parse(last.body).detail, new RegExp(feature))
  }
})

await check('meters.delete (a Draft meter)', async () => {
  await om.meters.create({ slug: 'sdk_scratch', aggregation: 'COUNT', eventType: 'sdk.scratch' })
  await om.meters.delete('sdk_scratch')
  await refused(om.meters.get('sdk_scratch'), 404)
})

// Tally's own routes beside OpenMeter's, recorded for the validation too.
await check("Tally's resources, voids and quarantine", async () => {
  const call = async (method, path, body, type = 'application/json') => {
    const r = await recordingFetch(`${base}${path}`, {
      method,
      headers: { authorization: `Bearer ${token}`, 'content-type': type },
      body,
    })
    const text = await r.text()
    assert.ok(r.ok, `${method} ${path}: ${r.status} ${text}`)
    return r.status === 204 ? null : JSON.parse(text)
  }
  const manifest = {
    apiVersion: 'billing.miloapis.com/v1alpha1', kind: 'MeterDefinition',
    metadata: { name: 'sdk-requests', labels: { team: 'sdk' } },
    spec: { meterName: 'sdk/requests', measurement: { aggregation: 'Sum', unit: '{request}' } },
  }
  await call('POST', '/apis/apply', JSON.stringify(manifest))
  const listed = await call('GET', '/apis/meterdefinitions')
  assert.ok(listed.items.some((m) => m.metadata.name === 'sdk-requests'))
  const one = await call('GET', '/apis/meterdefinitions/sdk-requests')
  assert.ok(one.metadata.uid && one.metadata.creationTimestamp && one.metadata.updateTimestamp)
  await call('PUT', '/apis/meterdefinitions/sdk-requests', JSON.stringify(manifest))
  const voided = await call('POST', '/api/v1/events/void', JSON.stringify({ source: 'sdk-suite', id: 'js-3', reason: 'suite' }))
  assert.equal(voided.record.id, 'js-3')
  const voids = await call('GET', '/api/v1/events/voids')
  assert.equal(voids.items.length, 1)
  // An event of a type no meter reads is stored and quarantined.
  await call('POST', '/api/v1/events', JSON.stringify({ specversion: '1.0', id: 'q-1', source: 'sdk-suite', type: 'sdk.unmetered', subject: 'c' }), 'application/cloudevents+json')
  const quarantined = await call('GET', '/api/v1/quarantine')
  assert.ok(quarantined.items.some((q) => q.event.event.id === 'q-1'), JSON.stringify(quarantined))
  const withRepresentation = await recordingFetch(`${base}/api/v1/events`, {
    method: 'POST',
    headers: { authorization: `Bearer ${token}`, 'content-type': 'application/cloudevents+json', prefer: 'return=representation' },
    body: JSON.stringify({ specversion: '1.0', id: 'q-2', source: 'sdk-suite', type: 'sdk.unmetered', subject: 'c' }),
  })
  assert.equal(withRepresentation.status, 200)
})

// Every recorded answer against /openapi.json.
await check('every answer matches /openapi.json', async () => {
  const doc = await (await fetch(`${base}/openapi.json`, { headers: { authorization: `Bearer ${token}` } })).json()
  const ajv = new Ajv2020({ strict: false, allErrors: true })
  addFormats(ajv)
  ajv.addSchema({ $id: 'tally', components: doc.components })
  const templates = Object.keys(doc.paths).map((p) => ({
    p,
    // `{rest}` (routes not served) stands for any number of segments.
    re: new RegExp('^' + p.replace('{rest}', '.+').replace(/\{[^}]+\}/g, '[^/]+') + '$'),
  }))
  let validated = 0
  for (const r of recorded) {
    const route = templates.filter((t) => t.re.test(r.path)).sort((a, b) => a.p.split('{').length - b.p.split('{').length)[0]
    assert.ok(route, `no route of the document matches ${r.method} ${r.path}`)
    const op = doc.paths[route.p][r.method.toLowerCase()]
    assert.ok(op, `the document has no ${r.method} ${route.p}`)
    const answer = op.responses?.[String(r.status)]
    assert.ok(answer, `the document has no ${r.status} for ${r.method} ${route.p}`)
    if (!answer.content) {
      assert.equal(r.body, '', `${r.method} ${route.p} ${r.status} has a body the document does not describe`)
      continue
    }
    const media = r.contentType.split(';')[0].trim()
    const schema = answer.content[media]?.schema
    assert.ok(schema, `${r.method} ${route.p} ${r.status}: the document has no ${media} body`)
    const rewritten = JSON.parse(JSON.stringify(schema).replaceAll('"#/components', '"tally#/components'))
    const validate = ajv.compile(rewritten)
    if (!validate(JSON.parse(r.body))) {
      assert.fail(`${r.method} ${r.path} ${r.status}: ${ajv.errorsText(validate.errors)}\n${r.body.slice(0, 2000)}`)
    }
    validated++
  }
  console.log(`validated ${validated} answers with bodies of ${recorded.length} recorded`)
})
