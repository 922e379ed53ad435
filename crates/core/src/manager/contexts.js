// forkbox code contexts in the sandbox's JavaScript REPL: each a V8 context of its own
// (node's vm module: its own globals), with its own working directory
// (crates/core/src/manager/contexts.rs). Installed once per REPL as
// globalThis.__forkbox_ctx_v2__. Ops `new`, `del`, `has` and `run` end with one line on
// stdout: "\n" + nonce + JSON; `exec` runs a cell as the REPL runs one (prints the
// value with util.inspect, the stack on stderr and status 1 on error).
globalThis.__forkbox_ctx_v2__ = async function (op, ctx, code, nonce, cwd) {
  const vm = require('vm');
  const util = require('util');
  const fs = require('fs');
  const reg = (globalThis.__forkbox_ctx_ns__ ||= new Map());
  const emit = (d) => {
    process.stdout.write('\n' + nonce + JSON.stringify(d) + '\n');
  };
  if (op === 'new') {
    let dir = false;
    try {
      dir = fs.statSync(cwd).isDirectory();
    } catch {}
    if (!dir) return emit({ invalid: `cwd ${cwd} is not a directory in the sandbox` });
    const globals = {
      console, require, process, Buffer, URL, URLSearchParams, TextEncoder, TextDecoder,
      setTimeout, clearTimeout, setInterval, clearInterval, setImmediate, clearImmediate,
      queueMicrotask, structuredClone, fetch: globalThis.fetch,
    };
    reg.set(ctx, { context: vm.createContext(globals), cwd });
    return emit({ ok: true });
  }
  if (op === 'del') return emit({ ok: reg.delete(ctx) });
  if (op === 'has') return emit({ ok: reg.has(ctx) });
  const c = reg.get(ctx);
  if (!c) {
    if (op === 'exec') throw { stack: `forkbox: code context ${ctx} not found` };
    return emit({ missing: true });
  }
  const here = process.cwd();
  try {
    process.chdir(c.cwd);
  } catch {}
  let value;
  let error = null;
  try {
    value = vm.runInContext(code, c.context, { filename: '<cell>', breakOnSigint: true });
    if (value && typeof value.then === 'function') value = await value;
  } catch (e) {
    error = e && e.stack ? String(e.stack) : String(e);
  } finally {
    // The context keeps the directory its code moved to; the REPL keeps its own.
    c.cwd = process.cwd();
    process.chdir(here);
  }
  if (op === 'exec') {
    if (error !== null) throw { stack: error };
    if (value !== undefined) console.log(util.inspect(value));
    return;
  }
  emit({ results: value === undefined ? [] : [{ 'text/plain': util.inspect(value) }], error });
};
