// forkbox javascript kernel driver: cells arrive NUL-terminated on fd 3; after each cell
// the driver writes "<status>\n" to fd 3. Globals persist between cells.
'use strict';
const vm = require('vm');
const util = require('util');
const net = require('net');
globalThis.require = require;
process.on('SIGINT', () => {});
const ctl = new net.Socket({ fd: 3, readable: true, writable: true });
let pending = Buffer.alloc(0);
let queue = Promise.resolve();
async function run(cell) {
  let status = 0;
  try {
    let r = vm.runInThisContext(cell, { filename: '<cell>', breakOnSigint: true });
    if (r && typeof r.then === 'function') r = await r;
    if (r !== undefined) console.log(util.inspect(r));
  } catch (e) {
    process.stderr.write((e && e.stack ? e.stack : String(e)) + '\n');
    status = 1;
  }
  ctl.write(status + '\n');
}
ctl.on('data', (chunk) => {
  pending = Buffer.concat([pending, chunk]);
  let i;
  while ((i = pending.indexOf(0)) >= 0) {
    const cell = pending.subarray(0, i).toString('utf8');
    pending = pending.subarray(i + 1);
    queue = queue.then(() => run(cell));
  }
});
ctl.on('end', () => process.exit(0));
