// Sends identify, group, page and track calls through Segment's Node library
// (@segment/analytics-node) to a server given as --host, then prints a JSON
// summary on stdout. Run by tests/segment_clients.rs.
//
// Every call has its own user ID (`{prefix}-{i}`), so the test can tell which
// calls reached the fake Totango. --bad-item adds one track call with a
// wrongly typed field (`context.groupId` as an object) among good ones.
// --flush-at sets the library's batch size (default 15).
import { Analytics } from '@segment/analytics-node'
import { parseArgs } from 'node:util'

const { values: args } = parseArgs({
  options: {
    host: { type: 'string' },
    'write-key': { type: 'string' },
    count: { type: 'string', default: '1000' },
    prefix: { type: 'string', default: 'node' },
    'bad-item': { type: 'boolean', default: false },
    'flush-at': { type: 'string', default: '15' },
  },
})
const count = Number(args.count)
const analytics = new Analytics({
  writeKey: args['write-key'],
  host: args.host,
  path: '/v1/batch',
  flushAt: Number(args['flush-at']),
  flushInterval: 200,
  maxRetries: 3,
})

const errors = {}
let requests = 0
let maxBodyBytes = 0
const statuses = {}
analytics.on('error', (e) => {
  const why = String(e?.reason ?? e?.code ?? e)
  errors[why] = (errors[why] ?? 0) + 1
})
analytics.on('http_request', (r) => {
  requests += 1
  maxBodyBytes = Math.max(maxBodyBytes, Buffer.byteLength(r.body))
})
analytics.on('http_response', (r) => {
  statuses[r.status] = (statuses[r.status] ?? 0) + 1
})

const calls = ['identify', 'group', 'page', 'track']
const account = { groupId: `${args.prefix}-acct` }
for (let i = 0; i < count; i++) {
  const userId = `${args.prefix}-${i}`
  switch (calls[i % calls.length]) {
    case 'identify':
      analytics.identify({ userId, traits: { email: `${userId}@example.com`, plan: 'Paying' }, context: account })
      break
    case 'group':
      analytics.group({ userId, groupId: account.groupId, traits: { name: 'Acme', plan: 'Paying' } })
      break
    case 'page':
      analytics.page({ userId, name: 'Dashboard', properties: { url: 'https://app.example/d' }, context: account })
      break
    default:
      analytics.track({ userId, event: 'Created Report', properties: { rows: i }, context: account })
  }
  if (args['bad-item'] && i === Math.floor(count / 2)) {
    analytics.track({ userId: `${args.prefix}-bad`, event: 'Bad Item', context: { groupId: { id: 'acme' } } })
  }
}
await analytics.closeAndFlush({ timeout: 60000 })
console.log(
  JSON.stringify({
    sent: count + (args['bad-item'] ? 1 : 0),
    errors,
    requests,
    maxBodyBytes,
    statuses,
  })
)
