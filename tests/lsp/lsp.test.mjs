// The LSP bridge driven by a real LSP client: vscode-languageserver-protocol's
// connection over vscode-ws-jsonrpc's WebSocket reader and writer (the stack Monaco's
// language client uses in browsers), on the `ws` package, all from npm (make ts-deps).
// A real `forkbox serve` (FORKBOX_BIN, FORKBOX_AGENT_BIN, FORKBOX_TEST_POOL) runs a
// sandbox of the `lsp` template; files are written through the files API, then the
// python, typescript and go servers give completions and diagnostics for them.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { spawn, spawnSync } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { createRequire } from "node:module";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { createInterface } from "node:readline";
import { pathToFileURL } from "node:url";

const root = resolve(new URL("../..", import.meta.url).pathname);
const deps = process.env.TS_DEPS || join(root, "target/ts-deps");
const require = createRequire(join(deps, "package.json"));
const load = (name) => import(pathToFileURL(require.resolve(name)).href);
// ws and the protocol package are CommonJS: their exports are the module's default.
const { default: WebSocket } = await load("ws");
const { toSocket, WebSocketMessageReader, WebSocketMessageWriter } = await load("vscode-ws-jsonrpc");
const { default: lsp } = await load("vscode-languageserver-protocol");

const bin = process.env.FORKBOX_BIN || join(root, "target/debug/forkbox");
const agent = process.env.FORKBOX_AGENT_BIN || join(root, "target/agent/forkbox-agent");
const pool = process.env.FORKBOX_TEST_POOL || "/var/lib/forkbox-test/pool";
const KEY = "fbk_lsp_test_admin_key_0123456789";
let server;
let data;
let url;

before(async () => {
  data = mkdtempSync(join(tmpdir(), "forkbox-e2e-lsp-"));
  server = spawn(
    bin,
    ["serve", "--listen", "127.0.0.1:0", "--data-dir", data, "--pool", pool, "--agent-bin", agent, "--on-exit", "destroy"],
    {
      env: { ...process.env, FORKBOX_LOG: "warn", FORKBOX_AUTH: "true", FORKBOX_ADMIN_KEY: KEY },
      stdio: ["ignore", "pipe", "inherit"],
    },
  );
  url = await new Promise((ok, fail) => {
    const rl = createInterface({ input: server.stdout });
    rl.on("line", (line) => {
      if (line.startsWith("forkbox listening on ")) ok(line.split(" ").pop());
    });
    server.on("exit", (code) => fail(new Error(`forkbox serve exited (${code}) before listening`)));
  });
  server.stdout.resume();
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

async function api(method, path, body, key = KEY) {
  const res = await fetch(url + path, {
    method,
    headers: { authorization: `Bearer ${key}`, "content-type": "application/json" },
    body: body === undefined ? undefined : typeof body === "string" ? body : JSON.stringify(body),
  });
  const text = await res.text();
  return { status: res.status, body: text ? JSON.parse(text) : null };
}

// A command's stdout (the exec route answers NDJSON events).
async function sh(id, cmd) {
  const res = await fetch(`${url}/v1/sandboxes/${id}/exec`, {
    method: "POST",
    headers: { authorization: `Bearer ${KEY}`, "content-type": "application/json" },
    body: JSON.stringify({ cmd }),
  });
  assert.equal(res.status, 200);
  const events = (await res.text()).trim().split("\n").map((l) => JSON.parse(l));
  return events.filter((e) => e.type === "stdout").map((e) => e.data).join("");
}

async function writeFile(id, path, content) {
  const res = await fetch(`${url}/v1/sandboxes/${id}/files/raw?path=${encodeURIComponent(path)}`, {
    method: "PUT",
    headers: { authorization: `Bearer ${KEY}` },
    body: content,
  });
  assert.equal(res.status, 200, await res.text());
}

// A WebSocket to the bridge, or the HTTP answer that refused it.
function open(id, lang, key = KEY, query = "") {
  const ws = new WebSocket(`${url.replace("http", "ws")}/v1/sandboxes/${id}/lsp/${lang}${query}`, {
    headers: { authorization: `Bearer ${key}` },
  });
  return new Promise((ok) => {
    ws.once("open", () => ok({ ws }));
    ws.once("unexpected-response", (_req, res) => {
      let text = "";
      res.on("data", (c) => (text += c));
      res.on("end", () => ok({ status: res.statusCode, body: JSON.parse(text) }));
    });
    ws.once("error", (e) => ok({ error: e }));
  });
}

// An initialized LSP client connection over the bridge.
async function client(id, lang, capabilities = {}) {
  const { ws, status, body, error } = await open(id, lang);
  assert.ok(ws, `open ${lang}: ${status} ${JSON.stringify(body)} ${error}`);
  const socket = toSocket(ws);
  const conn = lsp.createProtocolConnection(new WebSocketMessageReader(socket), new WebSocketMessageWriter(socket));
  const diagnostics = new Map();
  const waiters = [];
  conn.onNotification(lsp.PublishDiagnosticsNotification.type, (p) => {
    diagnostics.set(p.uri, p.diagnostics);
    for (const w of waiters.splice(0)) w();
  });
  // Servers ask things of the client (configuration, progress tokens): answer them.
  conn.onRequest(lsp.ConfigurationRequest.type, (p) => p.items.map(() => null));
  conn.onRequest(lsp.WorkDoneProgressCreateRequest.type, () => null);
  conn.onRequest(lsp.RegistrationRequest.type, () => null);
  const closed = new Promise((ok) => ws.once("close", (code, reason) => ok({ code, reason: reason.toString() })));
  conn.listen();
  const init = await conn.sendRequest(lsp.InitializeRequest.type, {
    processId: process.pid,
    rootUri: null,
    capabilities: {
      textDocument: {
        completion: { completionItem: { snippetSupport: false } },
        publishDiagnostics: {},
        synchronization: { didSave: true },
      },
      workspace: { configuration: true, workspaceFolders: true },
      ...capabilities,
    },
  });
  await conn.sendNotification(lsp.InitializedNotification.type, {});
  // Diagnostics for `uri` that satisfy `pred`, as the server publishes them.
  const diagnosticsFor = async (uri, pred, ms = 60000) => {
    const deadline = Date.now() + ms;
    for (;;) {
      const d = diagnostics.get(uri);
      if (d && pred(d)) return d;
      const left = deadline - Date.now();
      assert.ok(left > 0, `no matching diagnostics for ${uri}: ${JSON.stringify(d)}`);
      await new Promise((ok) => {
        waiters.push(ok);
        setTimeout(ok, Math.min(left, 1000));
      });
    }
  };
  return { ws, conn, init, diagnosticsFor, closed };
}

const labels = (result) => (Array.isArray(result) ? result : result.items).map((i) => i.label);

async function sandbox() {
  const r = await api("POST", "/v1/sandboxes", { template: "lsp" });
  assert.equal(r.status, 201, JSON.stringify(r.body));
  return r.body.id;
}

test("python: completions and diagnostics for a file written through the files API", async () => {
  const id = await sandbox();
  const text = "import json\nimport os\n\ndef greet(name):\n    return 'hi ' + name\n\njson.du\nprint(undefined_name)\n";
  await writeFile(id, "/root/app.py", text);
  const c = await client(id, "python");
  try {
    // The workspace is the sandbox's directory: the client named none.
    assert.ok(c.init.capabilities.completionProvider, JSON.stringify(c.init.capabilities));
    const uri = "file:///root/app.py";
    await c.conn.sendNotification(lsp.DidOpenTextDocumentNotification.type, {
      textDocument: { uri, languageId: "python", version: 1, text },
    });
    const completions = await c.conn.sendRequest(lsp.CompletionRequest.type, {
      textDocument: { uri },
      position: { line: 6, character: 7 },
    });
    const got = labels(completions);
    assert.ok(got.some((l) => l.startsWith("dump")), `json.du… completions: ${got}`);
    // pyflakes: the undefined name and the unused import, on their lines.
    const diags = await c.diagnosticsFor(uri, (d) => d.some((x) => /undefined_name/.test(x.message)));
    assert.ok(diags.some((x) => /undefined name 'undefined_name'/.test(x.message) && x.range.start.line === 7), JSON.stringify(diags));
    assert.ok(diags.some((x) => /'os' imported but unused/.test(x.message) && x.range.start.line === 1), JSON.stringify(diags));
    // A message over the agent's 1 MiB frame size (a big file opened) passes whole.
    const big = "# filler line\n".repeat(100000) + "print(undefined_big)\n";
    assert.ok(big.length > 1300000);
    const bigUri = "file:///root/big.py";
    await c.conn.sendNotification(lsp.DidOpenTextDocumentNotification.type, {
      textDocument: { uri: bigUri, languageId: "python", version: 1, text: big },
    });
    const bigDiags = await c.diagnosticsFor(bigUri, (d) => d.some((x) => /undefined_big/.test(x.message)));
    assert.equal(bigDiags.find((x) => /undefined_big/.test(x.message)).range.start.line, 100000);
    // Shutting down politely ends the server and the socket (code 1000).
    await c.conn.sendRequest(lsp.ShutdownRequest.type);
    await c.conn.sendNotification(lsp.ExitNotification.type);
    const closed = await c.closed;
    assert.equal(closed.code, 1000);
    assert.match(closed.reason, /exited \(code 0\)/);
  } finally {
    c.ws.close();
    await api("DELETE", `/v1/sandboxes/${id}`);
  }
});

test("typescript: completions and type errors; the server ends with the socket", async () => {
  const id = await sandbox();
  const text = [
    "interface Point { x: number; y: number }",
    "const p: Point = { x: 1, y: 2 };",
    "p.",
    "const n: number = 'not a number';",
    "",
  ].join("\n");
  await writeFile(id, "/root/proj/main.ts", text);
  await writeFile(id, "/root/proj/tsconfig.json", JSON.stringify({ compilerOptions: { strict: true, noEmit: true } }));
  const c = await client(id, "typescript");
  const uri = "file:///root/proj/main.ts";
  try {
    await c.conn.sendNotification(lsp.DidOpenTextDocumentNotification.type, {
      textDocument: { uri, languageId: "typescript", version: 1, text },
    });
    const completions = await c.conn.sendRequest(lsp.CompletionRequest.type, {
      textDocument: { uri },
      position: { line: 2, character: 2 },
      context: { triggerKind: 2, triggerCharacter: "." },
    });
    const got = labels(completions);
    assert.ok(got.includes("x") && got.includes("y"), `p. completions: ${got}`);
    const diags = await c.diagnosticsFor(uri, (d) => d.some((x) => x.code === 2322));
    const typeError = diags.find((x) => x.code === 2322);
    assert.equal(typeError.range.start.line, 3);
    assert.match(typeError.message, /not assignable to type 'number'/);
  } finally {
    c.ws.close();
  }
  // Closing the socket ends the server: nothing of it is left in the sandbox.
  let left;
  for (let i = 0; i < 50; i++) {
    left = await sh(id, "pgrep -f '[t]ypescript-language-server' | wc -l; pgrep -f '[t]sserver' | wc -l");
    if (left === "0\n0\n") break;
    await new Promise((ok) => setTimeout(ok, 100));
  }
  assert.equal(left, "0\n0\n");
  await api("DELETE", `/v1/sandboxes/${id}`);
});

test("go: gopls completes the standard library and reports an undefined name", async () => {
  const id = await sandbox();
  const text = 'package main\n\nimport "fmt"\n\nfunc main() {\n\tfmt.Pr\n\tundefinedThing()\n}\n';
  await writeFile(id, "/root/hello/go.mod", "module example.com/hello\n\ngo 1.19\n");
  await writeFile(id, "/root/hello/main.go", text);
  const c = await client(id, "go");
  const uri = "file:///root/hello/main.go";
  try {
    await c.conn.sendNotification(lsp.DidOpenTextDocumentNotification.type, {
      textDocument: { uri, languageId: "go", version: 1, text },
    });
    const completions = await c.conn.sendRequest(lsp.CompletionRequest.type, {
      textDocument: { uri },
      position: { line: 5, character: 7 },
    });
    const got = labels(completions);
    assert.ok(got.includes("Println") && got.includes("Printf"), `fmt.Pr completions: ${got}`);
    const diags = await c.diagnosticsFor(uri, (d) => d.some((x) => /undefinedThing/.test(x.message)));
    assert.equal(diags.find((x) => /undefinedThing/.test(x.message)).range.start.line, 6);
  } finally {
    c.ws.close();
    await api("DELETE", `/v1/sandboxes/${id}`);
  }
});

test("refusals are JSON before the upgrade: unknown language, server missing, another workspace", async () => {
  const r = await api("POST", "/v1/sandboxes", { template: "python" });
  assert.equal(r.status, 201);
  const plain = r.body.id;
  const id = await sandbox();
  try {
    const unknown = await open(id, "cobol");
    assert.equal(unknown.status, 400);
    assert.match(unknown.body.error, /no language server for "cobol"; this server has: go, python, rust, typescript/);
    const missing = await open(plain, "python");
    assert.equal(missing.status, 400);
    assert.match(missing.body.error, /the python language server \(pylsp\) is not installed .*template "lsp"/);
    const badCwd = await open(id, "python", KEY, "?cwd=/nowhere");
    assert.equal(badCwd.status, 400);
    assert.match(badCwd.body.error, /cwd \/nowhere is not a directory/);
    // At most four sessions per sandbox at once: the fifth is 429 until one closes.
    const open4 = [];
    for (let i = 0; i < 4; i++) {
      const o = await open(id, "python");
      assert.ok(o.ws, JSON.stringify(o.body));
      open4.push(o.ws);
    }
    const fifth = await open(id, "python");
    assert.equal(fifth.status, 429);
    assert.match(fifth.body.error, /at most 4 LSP sessions per sandbox/);
    const closed = new Promise((ok) => open4[0].once("close", ok));
    open4[0].close();
    await closed;
    let again;
    for (let i = 0; i < 50; i++) {
      again = await open(id, "python");
      if (again.ws) break;
      await new Promise((ok) => setTimeout(ok, 100));
    }
    assert.ok(again.ws, JSON.stringify(again.body));
    for (const w of [...open4.slice(1), again.ws]) w.close();
    // A key of another workspace does not see the sandbox.
    const other = await api("POST", "/v1/auth/tokens", { name: "other", workspace: "other-ws" });
    assert.equal(other.status, 201, JSON.stringify(other.body));
    const foreign = await open(id, "python", other.body.key);
    assert.equal(foreign.status, 404);
    const anonymous = await open(id, "python", "fbx_not_a_key");
    assert.equal(anonymous.status, 401);
    // Not a WebSocket: a clear 400.
    const get = await api("GET", `/v1/sandboxes/${id}/lsp/python`);
    assert.equal(get.status, 400);
    assert.match(get.body.error, /WebSocket upgrade/);
  } finally {
    await api("DELETE", `/v1/sandboxes/${id}`);
    await api("DELETE", `/v1/sandboxes/${plain}`);
  }
});
