// The SDK against a real `forkbox serve` (the one `make test` built): FORKBOX_BIN,
// FORKBOX_AGENT_BIN and FORKBOX_TEST_POOL as for the Rust and Python suites.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { spawn, spawnSync } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { createInterface } from "node:readline";
import { Client, Gone, NotFound, Sandbox, Conflict } from "../src/index.js";

const root = resolve(import.meta.dirname ?? new URL(".", import.meta.url).pathname, "../../..");
const bin = process.env.FORKBOX_BIN || join(root, "target/debug/forkbox");
const agent = process.env.FORKBOX_AGENT_BIN || join(root, "target/agent/forkbox-agent");
const pool = process.env.FORKBOX_TEST_POOL || "/var/lib/forkbox-test/pool";
let server;
let data;
let client;

before(async () => {
  data = mkdtempSync(join(tmpdir(), "forkbox-js-"));
  server = spawn(
    bin,
    ["serve", "--listen", "127.0.0.1:0", "--data-dir", data, "--pool", pool, "--agent-bin", agent, "--on-exit", "destroy"],
    { env: { ...process.env, FORKBOX_LOG: "warn" }, stdio: ["ignore", "pipe", "inherit"] },
  );
  const url = await new Promise((ok, fail) => {
    const rl = createInterface({ input: server.stdout });
    rl.on("line", (line) => {
      if (line.startsWith("forkbox listening on ")) ok(line.split(" ").pop());
    });
    server.on("exit", (code) => fail(new Error(`forkbox serve exited (${code}) before listening`)));
  });
  // Keep draining stdout so the server never blocks on it.
  server.stdout.resume();
  process.env.FORKBOX_URL = url;
  client = new Client();
});

after(async () => {
  if (server && server.exitCode === null) {
    const exited = new Promise((ok) => server.on("exit", ok));
    server.kill("SIGTERM");
    await exited;
  }
  if (data) {
    spawnSync(bin, ["down", "--purge", "--data-dir", data, "--pool", pool], {
      env: { ...process.env, FORKBOX_LOG: "warn" },
      stdio: "ignore",
    });
    rmSync(data, { recursive: true, force: true });
  }
});

test("runCode keeps REPL state and streams events as they happen", async () => {
  const sb = await Sandbox.create({ client, metadata: { suite: "js" } });
  try {
    assert.match(sb.id, /^sbx-/);
    assert.equal(sb.info.metadata.suite, "js");
    assert.equal((await sb.runCode("x = 41")).exitCode, 0);
    const r = await sb.runCode("print(x + 1)");
    assert.equal(r.stdout, "42\n");
    assert.equal(r.text, "42\n");
    const seen = [];
    for await (const ev of sb.runCodeStream("import time\nfor i in range(3):\n    print(i, flush=True)\n    time.sleep(0.05)")) {
      seen.push(ev.type === "exit" ? `exit ${ev.data}` : ev.data);
    }
    assert.deepEqual(seen, ["0\n", "1\n", "2\n", "exit 0"]);
    const err = await sb.runCode("1/0");
    assert.equal(err.exitCode, 1);
    assert.match(err.stderr, /ZeroDivisionError/);
    const js = await sb.runCode("console.log(6 * 7)", { language: "javascript" });
    assert.equal(js.stdout, "42\n");
  } finally {
    await sb.kill();
  }
});

test("exec collects or streams a command, with cwd, env and exit code", async () => {
  const sb = await Sandbox.create({ client });
  try {
    const r = await sb.exec("echo out; echo err >&2; pwd; echo $GREETING; exit 3", {
      cwd: "/tmp",
      env: { GREETING: "hi" },
    });
    assert.deepEqual([r.stdout, r.stderr, r.exitCode], ["out\n/tmp\nhi\n", "err\n", 3]);
    const types = [];
    for await (const ev of sb.execStream("echo a; echo b")) types.push(ev.type);
    assert.deepEqual(types, ["stdout", "stdout", "exit"]);
    const cmd = await sb.commands.start("read line; echo got $line");
    await cmd.sendStdin("x\n", { close: true });
    assert.equal(await cmd.wait(), 0);
    const out = [];
    for await (const ev of cmd.output({ follow: false })) if (ev.type === "stdout") out.push(ev.data);
    assert.deepEqual(out, ["got x\n"]);
  } finally {
    await sb.kill();
  }
});

test("files: write, read, stream, list, stat, mkdir, rename, remove", async () => {
  const sb = await Sandbox.create({ client });
  try {
    await sb.files.write("notes/a.txt", "hello");
    assert.equal(await sb.files.readText("/root/notes/a.txt"), "hello");
    const big = new Uint8Array(3 * 1024 * 1024).map((_, i) => i % 251);
    const chunks = [big.slice(0, 1 << 20), big.slice(1 << 20)];
    const stream = new ReadableStream({
      pull(c) {
        const next = chunks.shift();
        if (next) c.enqueue(next);
        else c.close();
      },
    });
    await sb.files.write("/root/big.bin", stream);
    const back = await sb.files.read("/root/big.bin");
    assert.equal(back.length, big.length);
    assert.ok(Buffer.from(back).equals(Buffer.from(big)));
    let streamed = 0;
    for await (const c of await sb.files.readStream("/root/big.bin")) streamed += c.length;
    assert.equal(streamed, big.length);
    await sb.files.mkdir("/root/dir");
    await sb.files.rename("/root/notes/a.txt", "/root/dir/b.txt");
    const names = (await sb.files.list("/root/dir")).map((e) => e.name);
    assert.deepEqual(names, ["b.txt"]);
    assert.equal((await sb.files.stat("/root/dir/b.txt")).size, 5);
    assert.equal(await sb.files.exists("/root/notes/a.txt"), false);
    await sb.files.remove("/root/dir", { recursive: true });
    assert.equal(await sb.files.exists("/root/dir"), false);
    await assert.rejects(sb.files.read("/root/nope"), NotFound);
  } finally {
    await sb.kill();
  }
});

test("fork carries files and REPL state; mergeInto takes the winner's", async () => {
  const parent = await Sandbox.create({ client });
  try {
    await parent.runCode("n = 1");
    await parent.files.write("/root/f", "parent");
    const kids = await parent.fork(2);
    assert.equal(kids.length, 2);
    for (const [i, k] of kids.entries()) {
      assert.equal((await k.runCode("print(n)")).stdout, "1\n");
      assert.equal(await k.files.readText("/root/f"), "parent");
      await k.runCode(`n = ${10 + i}`);
    }
    await parent.mergeInto(kids[1]);
    assert.equal((await parent.runCode("print(n)")).stdout, "11\n");
    await assert.rejects(kids[1].refresh(), (e) => e instanceof Gone || e instanceof NotFound);
    await kids[0].kill();
  } finally {
    await parent.kill();
  }
});

test("pause, resume, hibernate, wake, timeout and lifecycle events", async () => {
  const sb = await Sandbox.create({ client });
  try {
    await sb.runCode("kept = 'yes'");
    assert.equal((await sb.pause()).status, "paused");
    await assert.rejects(sb.exec("true"), Conflict);
    assert.equal((await sb.resume()).status, "running");
    assert.equal((await sb.hibernate()).status, "hibernated");
    assert.equal((await sb.wake()).status, "running");
    assert.equal((await sb.setTimeout(120)).timeout, 120);
    const kinds = [];
    for await (const ev of sb.events()) kinds.push(ev.type ?? ev.kind);
    for (const k of ["created", "paused", "resumed", "hibernated"]) assert.ok(kinds.includes(k), `${k} in ${kinds}`);
  } finally {
    await sb.kill();
  }
  await assert.rejects(sb.refresh(), Gone);
  await sb.kill(); // already gone is fine
});

test("code contexts keep their own state and cwd, runCode names one, a fork carries them", async () => {
  const sb = await Sandbox.create({ client });
  try {
    const a = await sb.createContext();
    const b = await sb.createContext();
    await a.run("x = 1");
    await b.run("x = 2");
    const r = await a.run("print(x)\nx * 10");
    assert.equal(r.stdout, "1\n");
    assert.equal(r.results[0]["text/plain"], "10");
    assert.equal((await b.run("print(x)")).stdout, "2\n");
    const err = await a.run("1/0");
    assert.equal(err.exitCode, 1);
    assert.match(err.error, /ZeroDivisionError/);
    // runCode in a context streams like any cell; each context keeps its cwd.
    await sb.exec("mkdir -p /root/work");
    const w = await sb.createContext({ cwd: "/root/work" });
    assert.equal((await sb.runCode("import os\nos.getcwd()", { context: w })).stdout, "'/root/work'\n");
    assert.equal((await sb.runCode("x + 1", { context: b.id })).stdout, "3\n");
    const js = await sb.createContext({ language: "javascript", cwd: "/tmp" });
    assert.equal(js.language, "javascript");
    assert.equal((await sb.runCode("let y = 6; y * 7", { context: js })).stdout, "42\n");
    assert.equal((await sb.runCode("process.cwd()", { context: js })).stdout, "'/tmp'\n");
    assert.equal((await js.run("typeof y")).results[0]["text/plain"], "'number'");
    const [kid] = await sb.fork(1);
    assert.equal((await kid.context(b.id).run("print(x)")).stdout, "2\n");
    await b.close();
    await assert.rejects(b.run("x"), NotFound);
    await kid.kill();
  } finally {
    await sb.kill();
  }
});

test("ports: a server in the sandbox is listed and reached by path", async () => {
  const sb = await Sandbox.create({ client });
  try {
    await sb.files.write("/root/www/hello.txt", "from the sandbox\n");
    await sb.commands.start("cd /root/www && exec python3 -m http.server 8000 --bind 0.0.0.0");
    let ports = [];
    for (let i = 0; i < 100 && !ports.some((p) => p.port === 8000); i++) {
      await new Promise((r) => setTimeout(r, 100));
      ports = await sb.ports();
    }
    const p = ports.find((x) => x.port === 8000);
    assert.ok(p, JSON.stringify(ports));
    assert.equal(p.path, `/v1/sandboxes/${sb.id}/ports/8000/`);
    const res = await fetch(sb.portUrl(8000, "/hello.txt"));
    assert.equal(res.status, 200);
    assert.equal(await res.text(), "from the sandbox\n");
    // A public link: its host opens the port with no key (Host set by hand with
    // node:http; fetch may not set it).
    const link = await sb.publicLink(8000, { expiresIn: 600 });
    assert.equal(link.url, `http://${link.host}/`);
    const { request } = await import("node:http");
    const body = await new Promise((ok, fail) => {
      const u = new URL(client.baseUrl);
      const r = request(
        { host: u.hostname, port: u.port, path: "/hello.txt", headers: { host: link.host } },
        (res) => {
          let b = "";
          res.on("data", (c) => (b += c));
          res.on("end", () => ok(`${res.statusCode} ${b}`));
        },
      );
      r.on("error", fail);
      r.end();
    });
    assert.equal(body, "200 from the sandbox\n");
  } finally {
    await sb.kill();
  }
});

test("errors are typed, listing pages, and traceparent comes from the environment", async () => {
  await assert.rejects(Sandbox.connect("sbx-0000000000000000", { client }), (e) => {
    assert.ok(e instanceof NotFound);
    assert.equal(e.status, 404);
    assert.equal(e.code, "not_found");
    return true;
  });
  const sent = [];
  const trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
  process.env.FORKBOX_TRACEPARENT = trace;
  const traced = new Client({
    fetch: (url, init) => {
      sent.push(init.headers.traceparent);
      return fetch(url, init);
    },
  });
  delete process.env.FORKBOX_TRACEPARENT;
  const made = [];
  try {
    for (let i = 0; i < 3; i++) made.push(await Sandbox.create({ client: traced }));
    assert.ok(sent.length >= 3 && sent.every((t) => t === trace), JSON.stringify(sent));
    const ids = (await client.sandboxes({ limit: 2 })).map((s) => s.id);
    for (const sb of made) assert.ok(ids.includes(sb.id));
  } finally {
    for (const sb of made) await sb.kill();
  }
});
