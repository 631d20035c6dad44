// Sends identify, group, page and track calls through RudderStack's Node
// library (@rudderstack/rudder-sdk-node) to a server given as --host, then
// prints a JSON summary on stdout. Run by tests/segment_clients.rs.
//
// Every call has its own user ID (`{prefix}-{i}`). --big-item adds one track
// call with a 40 KB property, over the server's per-message limit.
// --flush-at sets the library's batch size (default 20).
import Analytics from '@rudderstack/rudder-sdk-node'
import { parseArgs } from 'node:util'

const { values: args } = parseArgs({
  options: {
    host: { type: 'string' },
    'write-key': { type: 'string' },
    count: { type: 'string', default: '1000' },
    prefix: { type: 'string', default: 'rnode' },
    'big-item': { type: 'boolean', default: false },
    'flush-at': { type: 'string', default: '20' },
  },
})
const count = Number(args.count)
const errors = {}
const client = new Analytics(args['write-key'], {
  dataPlaneUrl: args.host,
  flushAt: Number(args['flush-at']),
  flushInterval: 200,
  logLevel: 'error',
  errorHandler: (e) => {
    const why = String(e?.response?.status ?? e?.code ?? e)
    errors[why] = (errors[why] ?? 0) + 1
  },
})

const calls = ['identify', 'group', 'page', 'track']
const account = { groupId: `${args.prefix}-acct` }
for (let i = 0; i < count; i++) {
  const userId = `${args.prefix}-${i}`
  switch (calls[i % calls.length]) {
    case 'identify':
      client.identify({ userId, traits: { email: `${userId}@example.com`, plan: 'Paying' }, context: account })
      break
    case 'group':
      client.group({ userId, groupId: account.groupId, traits: { name: 'Acme', plan: 'Paying' } })
      break
    case 'page':
      client.page({ userId, name: 'Dashboard', properties: { url: 'https://app.example/d' }, context: account })
      break
    default:
      client.track({ userId, event: 'Created Report', properties: { rows: i }, context: account })
  }
  if (args['big-item'] && i === Math.floor(count / 2)) {
    client.track({ userId: `${args.prefix}-big`, event: 'Big Item', properties: { blob: 'x'.repeat(40000) }, context: account })
  }
}
await client.flush()
// flush() resolves when the queue is handed over; wait for the last request.
await new Promise((resolve) => client.flush(resolve))
console.log(JSON.stringify({ sent: count + (args['big-item'] ? 1 : 0), errors }))
