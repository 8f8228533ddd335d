// usage: node audit.mjs http://127.0.0.1:PORT/graphql
// Prints one JSON line per audit result and exits 1 when any is not "ok".
import { auditServer } from 'graphql-http';

const url = process.argv[2];
const results = await auditServer({ url, fetchFn: fetch });
let bad = 0;
for (const result of results) {
  const line = { id: result.id, name: result.name, status: result.status };
  if (result.status !== 'ok') {
    bad += 1;
    line.reason = result.reason;
  }
  console.log(JSON.stringify(line));
}
console.log(JSON.stringify({ total: results.length, notOk: bad }));
process.exit(bad ? 1 : 0);
