// forkbox — the TypeScript/JavaScript SDK (ESM, types in index.d.ts). Runs on any
// runtime with `fetch` and web streams: Node ≥ 18, Deno, Bun, workers. The surface
// mirrors the Python SDK (sdk/python): a Client, Sandbox with run_code/exec (collected
// or as async iterators of events), files, fork/merge, pause/hibernate, ports.

export const DEFAULT_URL = "http://127.0.0.1:7070";
const VERSION = "0.1.0";

const env = (name) =>
  (typeof process !== "undefined" && process.env && process.env[name]) || undefined;

/** An error answered by the server: its message, HTTP status and stable code. */
export class ForkboxError extends Error {
  constructor(message, status = 0, code = "") {
    super(message);
    this.name = new.target.name;
    this.status = status;
    this.code = code;
  }
}
/** 400: the request was invalid. */
export class BadRequest extends ForkboxError {}
/** 401/403: no key, an unknown key, or one that may not do this. */
export class Unauthorized extends ForkboxError {}
/** 404: no such sandbox, file, process or snapshot. */
export class NotFound extends ForkboxError {}
/** 409: the sandbox is not in a state that allows the call. */
export class Conflict extends ForkboxError {}
/** 410: the sandbox ended (deleted, expired, failed, merged, lost). */
export class Gone extends ForkboxError {}
/** 413: the body is over the limit. */
export class TooLarge extends ForkboxError {}
/** 429: a quota or rate limit. */
export class TooMany extends ForkboxError {}
/** 5xx: the server, another node or the sandbox's agent failed. */
export class ServerError extends ForkboxError {}

const BY_STATUS = {
  400: BadRequest,
  401: Unauthorized,
  403: Unauthorized,
  404: NotFound,
  409: Conflict,
  410: Gone,
  413: TooLarge,
  429: TooMany,
};

async function errorFor(res) {
  const text = await res.text().catch(() => "");
  let message = text;
  let code = "";
  try {
    const v = JSON.parse(text || "{}");
    message = v.error || "";
    code = v.code || "";
  } catch {
    // Not JSON: the text is the message.
  }
  const Cls = BY_STATUS[res.status] || (res.status >= 500 ? ServerError : ForkboxError);
  return new Cls(message || `HTTP ${res.status}`, res.status, code);
}

/** Lines of a byte stream, as text, each without its newline; blank lines skipped. */
async function* lines(body) {
  const decoder = new TextDecoder();
  let buf = "";
  for await (const chunk of body) {
    buf += decoder.decode(chunk, { stream: true });
    let i;
    while ((i = buf.indexOf("\n")) >= 0) {
      const line = buf.slice(0, i);
      buf = buf.slice(i + 1);
      if (line.trim()) yield line;
    }
  }
  buf += decoder.decode();
  if (buf.trim()) yield buf;
}

/** Server-Sent Events of a byte stream: `{event, data}` with `data` parsed as JSON. */
async function* sse(body) {
  let event = "message";
  let data = [];
  const decoder = new TextDecoder();
  let buf = "";
  for await (const chunk of body) {
    buf += decoder.decode(chunk, { stream: true }).replace(/\r\n/g, "\n");
    let i;
    while ((i = buf.indexOf("\n")) >= 0) {
      const line = buf.slice(0, i);
      buf = buf.slice(i + 1);
      if (line === "") {
        if (data.length) yield { event, data: JSON.parse(data.join("\n")) };
        event = "message";
        data = [];
      } else if (line.startsWith("event:")) {
        event = line.slice(6).trim();
      } else if (line.startsWith("data:")) {
        data.push(line.slice(5).trimStart());
      }
    }
  }
}

/** The collected result of a command or cell. */
export class Execution {
  constructor() {
    this.stdout = "";
    this.stderr = "";
    this.exitCode = -1;
    this.events = [];
  }
  get text() {
    return this.stdout;
  }
  add(ev) {
    this.events.push(ev);
    if (ev.type === "stdout") this.stdout += ev.data;
    else if (ev.type === "stderr") this.stderr += ev.data;
    else if (ev.type === "exit") this.exitCode = ev.data;
  }
}

/** A connection to a forkbox server, shared by sandboxes. */
export class Client {
  constructor(opts = {}) {
    this.baseUrl = (opts.baseUrl || env("FORKBOX_URL") || env("PODFLARE_URL") || DEFAULT_URL).replace(
      /\/+$/,
      "",
    );
    this.apiKey = opts.apiKey || env("FORKBOX_API_KEY") || env("PODFLARE_API_KEY");
    this.traceparent = opts.traceparent || env("FORKBOX_TRACEPARENT") || env("PODFLARE_TRACEPARENT");
    this.timeoutMs = opts.timeoutMs ?? 300_000;
    this.fetch = opts.fetch || globalThis.fetch.bind(globalThis);
  }

  headers(extra = {}) {
    const h = { "user-agent": `forkbox-js/${VERSION}`, ...extra };
    if (this.apiKey) h.authorization = `Bearer ${this.apiKey}`;
    if (this.traceparent && !h.traceparent) h.traceparent = this.traceparent;
    return h;
  }

  url(path, query) {
    const u = new URL(this.baseUrl + path);
    for (const [k, v] of Object.entries(query || {})) {
      if (v !== undefined && v !== null) u.searchParams.set(k, String(v));
    }
    return u;
  }

  /** A request; an answer ≥ 400 throws the matching ForkboxError. */
  async request(method, path, { query, json, body, headers, signal } = {}) {
    const h = this.headers(headers);
    let payload = body;
    if (json !== undefined) {
      h["content-type"] = "application/json";
      payload = JSON.stringify(json);
    }
    const init = {
      method,
      headers: h,
      body: payload,
      signal: signal || AbortSignal.timeout(this.timeoutMs),
    };
    // A streamed request body needs half-duplex (Node's fetch).
    if (payload && typeof payload === "object" && typeof payload.getReader === "function") {
      init.duplex = "half";
    }
    const res = await this.fetch(this.url(path, query), init);
    if (res.status >= 400) throw await errorFor(res);
    return res;
  }

  async json(method, path, json = {}, opts = {}) {
    const res = await this.request(method, path, { ...opts, json });
    const text = await res.text();
    return text ? JSON.parse(text) : null;
  }

  /** Every sandbox (live ones by default), following pagination. */
  async sandboxes({ status, limit = 100 } = {}) {
    const out = [];
    let token;
    for (;;) {
      const res = await this.request("GET", "/v1/sandboxes", {
        query: { limit, status, next_token: token },
      });
      const page = await res.json();
      out.push(...page.sandboxes);
      token = page.next_token;
      if (!token) return out;
    }
  }

  async snapshots() {
    return (await (await this.request("GET", "/v1/snapshots")).json()).snapshots;
  }

  async deleteSnapshot(id) {
    await this.request("DELETE", `/v1/snapshots/${encodeURIComponent(id)}`);
  }
}

const CREATE_FIELDS = {
  template: "template",
  cpu: "cpu",
  memoryMb: "memory_mb",
  diskMb: "disk_mb",
  timeout: "timeout",
  idleTimeout: "idle_timeout",
  env: "env",
  metadata: "metadata",
  onTimeout: "on_timeout",
  snapshot: "snapshot",
  egressAllowlist: "egress_allowlist",
  volumes: "volumes",
  runtime: "runtime",
};

/** A sandbox. `Sandbox.create()` makes one; `Sandbox.connect(id)` attaches. */
export class Sandbox {
  constructor(client, id, info = {}, traceparent) {
    this.client = client;
    this.id = id;
    this.info = info;
    this.traceparent = traceparent;
    this.files = new Files(this);
    this.commands = new Commands(this);
  }

  /** Creates a sandbox; options as the API's create body, in camelCase. */
  static async create(opts = {}) {
    const client = opts.client || new Client(opts);
    const body = {};
    for (const [k, wire] of Object.entries(CREATE_FIELDS)) {
      if (opts[k] !== undefined) body[wire] = opts[k];
    }
    const headers = opts.traceparent ? { traceparent: opts.traceparent } : {};
    const info = await client.json("POST", "/v1/sandboxes", body, { headers });
    return new Sandbox(client, info.id, info, opts.traceparent);
  }

  /** An existing sandbox by id. */
  static async connect(id, opts = {}) {
    const client = opts.client || new Client(opts);
    const sb = new Sandbox(client, id, {}, opts.traceparent);
    await sb.refresh();
    return sb;
  }

  path(suffix = "") {
    return `/v1/sandboxes/${encodeURIComponent(this.id)}${suffix}`;
  }

  h() {
    return this.traceparent ? { traceparent: this.traceparent } : {};
  }

  async refresh() {
    this.info = await (await this.client.request("GET", this.path())).json();
    return this.info;
  }

  async status() {
    return (await this.refresh()).status;
  }

  /** Deletes the sandbox; already gone is fine. */
  async kill() {
    try {
      await this.client.request("DELETE", this.path());
    } catch (e) {
      if (!(e instanceof NotFound || e instanceof Gone)) throw e;
    }
  }

  /** `await using sb = await Sandbox.create()` deletes it at the end of the block. */
  async [Symbol.asyncDispose ?? Symbol.for("Symbol.asyncDispose")]() {
    await this.kill();
  }

  async setTimeout(seconds) {
    this.info = await this.client.json("POST", this.path("/timeout"), { timeout: seconds });
    return this.info;
  }
  pause() {
    return this.client.json("POST", this.path("/pause"));
  }
  resume() {
    return this.client.json("POST", this.path("/resume"));
  }
  hibernate() {
    return this.client.json("POST", this.path("/hibernate"));
  }
  wake() {
    return this.client.json("POST", this.path("/wake"));
  }
  snapshot(name) {
    return this.client.json("POST", this.path("/snapshot"), { name });
  }

  /** `n` children starting from this sandbox's exact state (files and REPL). */
  async fork(n = 1) {
    const v = await this.client.json("POST", this.path("/fork"), { n }, { headers: this.h() });
    return v.children.map((id) => new Sandbox(this.client, id, {}, this.traceparent));
  }

  /** Makes `winner`'s state (a fork descendant) this sandbox's; `winner` is consumed. */
  mergeInto(winner) {
    const id = typeof winner === "string" ? winner : winner.id;
    return this.client.json("POST", this.path(`/merge_into/${encodeURIComponent(id)}`), {}, {
      headers: this.h(),
    });
  }

  async *_exec(body, signal) {
    const res = await this.client.request("POST", this.path("/exec"), {
      json: body,
      headers: this.h(),
      signal,
    });
    for await (const line of lines(res.body)) yield JSON.parse(line);
  }

  /** Events of a cell in the sandbox's persistent REPL (or in code context `context`,
   *  a Context or its id), as they happen. */
  runCodeStream(code, { language, timeout, context, signal } = {}) {
    const body = { code };
    if (context !== undefined) {
      body.context = typeof context === "string" ? context : context.id;
      if (language !== undefined) body.language = language;
    } else {
      body.language = language ?? "python";
    }
    if (timeout !== undefined) body.timeout = timeout;
    return this._exec(body, signal);
  }

  async runCode(code, opts = {}) {
    const out = new Execution();
    for await (const ev of this.runCodeStream(code, opts)) out.add(ev);
    return out;
  }

  /** Events of a shell command (`/bin/sh -c`), as they happen. */
  execStream(cmd, { cwd, env, timeout, signal } = {}) {
    const body = { cmd };
    if (cwd !== undefined) body.cwd = cwd;
    if (env !== undefined) body.env = env;
    if (timeout !== undefined) body.timeout = timeout;
    return this._exec(body, signal);
  }

  async exec(cmd, opts = {}) {
    const out = new Execution();
    for await (const ev of this.execStream(cmd, opts)) out.add(ev);
    return out;
  }

  /** Lifecycle events (created, paused, forked, …); `follow` keeps the stream open. */
  async *events({ follow = false, tail = 200, signal } = {}) {
    const res = await this.client.request("GET", this.path("/events"), {
      query: { follow: follow ? 1 : 0, tail },
      signal,
    });
    for await (const m of sse(res.body)) yield m.data;
  }

  /** A code context: a REPL of its own in the sandbox (`python` or `javascript`), with
   *  its own variables and working directory (`cwd`, default /root). */
  async createContext({ language = "python", cwd } = {}) {
    const body = { language };
    if (cwd !== undefined) body.cwd = cwd;
    const v = await this.client.json("POST", this.path("/contexts"), body);
    return new Context(this, v.id, v.language);
  }

  /** A context made earlier (after a fork, the child has the parent's contexts). */
  context(id) {
    return new Context(this, id);
  }

  /** TCP ports something listens on in the sandbox, with where each is reached. */
  async ports() {
    return (await (await this.client.request("GET", this.path("/ports"))).json()).ports;
  }

  /** A link that opens `port` without a key until it expires (seconds; default a day)
   *  or the sandbox ends: `{port, host, url, expires_at}`. */
  async publicLink(port, { expiresIn } = {}) {
    const json = { port };
    if (expiresIn !== undefined) json.expires_in = expiresIn;
    return (await this.client.request("POST", this.path("/previews"), { json })).json();
  }

  /** The URL of `port` by path on this server (the API's auth applies). */
  portUrl(port, path = "/") {
    return `${this.client.baseUrl}${this.path(`/ports/${port}`)}${path.startsWith("/") ? path : `/${path}`}`;
  }
}

/** A code context: its own variables, apart from other contexts and the REPL's. */
export class Context {
  constructor(sb, id, language) {
    this.sb = sb;
    this.id = id;
    this.language = language ?? (id.startsWith("ctxjs-") ? "javascript" : "python");
  }
  /** Runs a cell: `results` (MIME bundles of the last expression), stdout, stderr,
   * `error` (a traceback) and `exitCode`. */
  async run(code, { timeout } = {}) {
    const body = { code };
    if (timeout !== undefined) body.timeout = timeout;
    const v = await this.sb.client.json(
      "POST",
      this.sb.path(`/contexts/${encodeURIComponent(this.id)}/run`),
      body,
    );
    return { results: v.results, stdout: v.stdout, stderr: v.stderr, error: v.error ?? null, exitCode: v.exit_code };
  }
  async close() {
    await this.sb.client.request("DELETE", this.sb.path(`/contexts/${encodeURIComponent(this.id)}`));
  }
}

/** A sandbox's files (paths absolute, or relative to /root). */
export class Files {
  constructor(sb) {
    this.sb = sb;
  }
  async read(path) {
    const res = await this.sb.client.request("GET", this.sb.path("/files"), { query: { path } });
    return new Uint8Array(await res.arrayBuffer());
  }
  async readText(path) {
    return new TextDecoder().decode(await this.read(path));
  }
  /** Writes `data` (string, bytes, Blob, or a ReadableStream streamed as it comes). */
  async write(path, data) {
    const streamed = data && typeof data.getReader === "function";
    const body = typeof data === "string" ? new TextEncoder().encode(data) : data;
    const res = await this.sb.client.request("PUT", this.sb.path(streamed ? "/files/raw" : "/files"), {
      query: { path },
      body,
    });
    return res.json();
  }
  /** The file as a stream of bytes, not read whole. */
  async readStream(path) {
    const res = await this.sb.client.request("GET", this.sb.path("/files/raw"), { query: { path } });
    return res.body;
  }
  async list(path = "/root") {
    const res = await this.sb.client.request("GET", this.sb.path("/files/ls"), { query: { path } });
    return (await res.json()).entries;
  }
  async stat(path) {
    return (await this.sb.client.request("GET", this.sb.path("/files/stat"), { query: { path } })).json();
  }
  async exists(path) {
    try {
      await this.stat(path);
      return true;
    } catch (e) {
      if (e instanceof NotFound) return false;
      throw e;
    }
  }
  mkdir(path) {
    return this.sb.client.json("POST", this.sb.path("/files/mkdir"), { path });
  }
  rename(from, to) {
    return this.sb.client.json("POST", this.sb.path("/files/rename"), { from, to });
  }
  async remove(path, { recursive = false } = {}) {
    await this.sb.client.request("DELETE", this.sb.path("/files"), {
      query: { path, recursive: recursive ? "true" : undefined },
    });
  }
  /** Changes under `path` as they happen (create, modify, delete, …). */
  async *watch(path, { recursive = false, signal } = {}) {
    const res = await this.sb.client.request("GET", this.sb.path("/files/watch"), {
      query: { path, recursive: recursive ? 1 : 0 },
      signal,
    });
    for await (const m of sse(res.body)) yield m.data;
  }
}

/** A background command. */
export class Command {
  constructor(sb, info) {
    this.sb = sb;
    this.pid = info.pid;
    this.info = info;
  }
  p(suffix = "") {
    return this.sb.path(`/commands/${this.pid}${suffix}`);
  }
  async wait() {
    return (await (await this.sb.client.request("GET", this.p("/wait"))).json()).exit_code;
  }
  async sendStdin(data, { close = false } = {}) {
    await this.sb.client.request("POST", this.p("/stdin"), { json: { data, close } });
  }
  async signal(signal = "SIGTERM") {
    await this.sb.client.request("POST", this.p("/signal"), { json: { signal } });
  }
  async kill() {
    await this.sb.client.request("DELETE", this.p());
  }
  async *output({ follow = true, signal } = {}) {
    const res = await this.sb.client.request("GET", this.p("/output"), {
      query: { follow: follow ? 1 : 0 },
      signal,
    });
    for await (const line of lines(res.body)) yield JSON.parse(line);
  }
}

export class Commands {
  constructor(sb) {
    this.sb = sb;
  }
  async start(cmd, { cwd, env, timeout } = {}) {
    const body = { cmd, background: true };
    if (cwd !== undefined) body.cwd = cwd;
    if (env !== undefined) body.env = env;
    if (timeout !== undefined) body.timeout = timeout;
    return new Command(this.sb, await this.sb.client.json("POST", this.sb.path("/exec"), body));
  }
  async list() {
    return (await (await this.sb.client.request("GET", this.sb.path("/commands"))).json()).commands;
  }
}
