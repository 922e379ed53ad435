// Types of the forkbox SDK (src/index.js).

export declare const DEFAULT_URL: string;

/** An error answered by the server: its message, HTTP status and stable code. */
export declare class ForkboxError extends Error {
  readonly status: number;
  /** The API's stable error code, e.g. `not_found`, `quota_exceeded`. */
  readonly code: string;
  constructor(message: string, status?: number, code?: string);
}
export declare class BadRequest extends ForkboxError {}
export declare class Unauthorized extends ForkboxError {}
export declare class NotFound extends ForkboxError {}
export declare class Conflict extends ForkboxError {}
export declare class Gone extends ForkboxError {}
export declare class TooLarge extends ForkboxError {}
export declare class TooMany extends ForkboxError {}
export declare class ServerError extends ForkboxError {}

/** One event of an exec or run_code stream. */
export type Event =
  | { type: "stdout" | "stderr"; data: string; seq: number; ts: number }
  | { type: "exit"; data: number; seq: number; ts: number }
  | { type: string; data: unknown; seq: number; ts: number };

/** The collected result of a command or cell. */
export declare class Execution {
  stdout: string;
  stderr: string;
  /** -1 until the exit event arrived. */
  exitCode: number;
  events: Event[];
  readonly text: string;
  add(ev: Event): void;
}

export interface ClientOptions {
  /** Default: `FORKBOX_URL`, `PODFLARE_URL`, then http://127.0.0.1:7070. */
  baseUrl?: string;
  /** Default: `FORKBOX_API_KEY`, `PODFLARE_API_KEY`. */
  apiKey?: string;
  /** W3C trace context sent with every call. Default: `FORKBOX_TRACEPARENT`. */
  traceparent?: string;
  /** Per request, default 300 000. */
  timeoutMs?: number;
  /** Another fetch (a runtime's, a test's). */
  fetch?: typeof fetch;
}

export interface RequestOptions {
  query?: Record<string, string | number | boolean | undefined | null>;
  json?: unknown;
  body?: BodyInit | null;
  headers?: Record<string, string>;
  signal?: AbortSignal;
}

/** The record of a sandbox, as the API answers it. */
export interface SandboxInfo {
  id: string;
  status: "running" | "paused" | "hibernated" | "deleted" | "killed" | "failed" | "merged" | "lost" | string;
  template: string;
  runtime: string;
  cpu: number;
  memory_mb: number;
  timeout: number;
  metadata: Record<string, string>;
  created_at: string;
  expires_at: string;
  node?: string | null;
  [key: string]: unknown;
}

export declare class Client {
  readonly baseUrl: string;
  apiKey?: string;
  traceparent?: string;
  timeoutMs: number;
  constructor(opts?: ClientOptions);
  /** A request; an answer ≥ 400 throws the matching ForkboxError. */
  request(method: string, path: string, opts?: RequestOptions): Promise<Response>;
  json<T = any>(method: string, path: string, json?: unknown, opts?: RequestOptions): Promise<T>;
  /** Every sandbox (live ones by default), following pagination. */
  sandboxes(opts?: { status?: string; limit?: number }): Promise<SandboxInfo[]>;
  snapshots(): Promise<Array<Record<string, unknown>>>;
  deleteSnapshot(id: string): Promise<void>;
}

export interface CreateOptions extends ClientOptions {
  client?: Client;
  template?: string;
  cpu?: number;
  memoryMb?: number;
  diskMb?: number;
  timeout?: number;
  idleTimeout?: number;
  env?: Record<string, string>;
  metadata?: Record<string, string>;
  onTimeout?: "kill" | "hibernate";
  snapshot?: string;
  egressAllowlist?: string[];
  volumes?: Array<{ id: string; mount: string; read_only?: boolean }>;
  runtime?: string;
}

export interface RunOptions {
  language?: "python" | "javascript" | "bash" | string;
  /** Seconds. */
  timeout?: number;
  /** Run in this code context (a Context or its id) instead of the REPL itself. */
  context?: Context | string;
  signal?: AbortSignal;
}

export interface ExecOptions {
  cwd?: string;
  env?: Record<string, string>;
  /** Seconds. */
  timeout?: number;
  signal?: AbortSignal;
}

export interface PublicLink {
  port: number;
  /** `{port}-{id}-{expiry}-{signature}.{preview domain}[:server port]` */
  host: string;
  url: string;
  expires_at: string;
}

export interface Port {
  port: number;
  address: string;
  /** By path on the server: `/v1/sandboxes/{id}/ports/{port}/`. */
  path: string;
  /** By host: `{port}-{id}.{preview domain}:{server port}`. */
  host: string;
}

export declare class Sandbox {
  readonly client: Client;
  readonly id: string;
  info: SandboxInfo | Record<string, never>;
  traceparent?: string;
  readonly files: Files;
  readonly commands: Commands;
  /** Creates a sandbox. */
  static create(opts?: CreateOptions): Promise<Sandbox>;
  /** An existing sandbox by id. */
  static connect(id: string, opts?: ClientOptions & { client?: Client }): Promise<Sandbox>;
  refresh(): Promise<SandboxInfo>;
  status(): Promise<string>;
  /** Deletes the sandbox; already gone is fine. */
  kill(): Promise<void>;
  setTimeout(seconds: number): Promise<SandboxInfo>;
  pause(): Promise<SandboxInfo>;
  resume(): Promise<SandboxInfo>;
  hibernate(): Promise<SandboxInfo>;
  wake(): Promise<SandboxInfo>;
  snapshot(name: string): Promise<{ id: string; name: string; [key: string]: unknown }>;
  /** `n` children starting from this sandbox's exact state (files and REPL). */
  fork(n?: number): Promise<Sandbox[]>;
  /** Makes `winner`'s state (a fork descendant) this sandbox's; `winner` is consumed. */
  mergeInto(winner: Sandbox | string): Promise<SandboxInfo>;
  /** Events of a cell in the sandbox's persistent REPL, as they happen. */
  runCodeStream(code: string, opts?: RunOptions): AsyncIterableIterator<Event>;
  runCode(code: string, opts?: RunOptions): Promise<Execution>;
  /** Events of a shell command, as they happen. */
  execStream(cmd: string, opts?: ExecOptions): AsyncIterableIterator<Event>;
  exec(cmd: string, opts?: ExecOptions): Promise<Execution>;
  /** Lifecycle events (created, paused, forked, …). */
  events(opts?: { follow?: boolean; tail?: number; signal?: AbortSignal }): AsyncIterableIterator<Record<string, unknown>>;
  /** A code context: a REPL of its own (`python` or `javascript`) with its own
   *  variables and working directory (`cwd`, default /root). */
  createContext(opts?: { language?: "python" | "javascript"; cwd?: string }): Promise<Context>;
  /** A context made earlier (after a fork, the child has the parent's contexts). */
  context(id: string): Context;
  /** TCP ports something listens on in the sandbox. */
  ports(): Promise<Port[]>;
  /** A link that opens `port` without a key until it expires or the sandbox ends. */
  publicLink(port: number, opts?: { expiresIn?: number }): Promise<PublicLink>;
  /** The URL of `port` by path on this server (the API's auth applies). */
  portUrl(port: number, path?: string): string;
  [Symbol.asyncDispose](): Promise<void>;
}

export interface ContextRun {
  /** MIME bundles of the last expression (`text/plain`, `text/html`, `image/png`, …). */
  results: Array<Record<string, string>>;
  stdout: string;
  stderr: string;
  /** The traceback of an uncaught exception. */
  error: string | null;
  exitCode: number;
}

/** A code context: its own variables, apart from other contexts and the REPL's. */
export declare class Context {
  readonly id: string;
  readonly language: "python" | "javascript";
  run(code: string, opts?: { timeout?: number }): Promise<ContextRun>;
  close(): Promise<void>;
}

export interface FileEntry {
  name: string;
  path: string;
  type: string;
  size: number;
  [key: string]: unknown;
}

export declare class Files {
  read(path: string): Promise<Uint8Array>;
  readText(path: string): Promise<string>;
  /** Writes a string, bytes, a Blob, or a ReadableStream (streamed as it comes). */
  write(path: string, data: string | Uint8Array | ArrayBuffer | Blob | ReadableStream<Uint8Array>): Promise<Record<string, unknown>>;
  /** The file as a stream of bytes, not read whole. */
  readStream(path: string): Promise<ReadableStream<Uint8Array>>;
  list(path?: string): Promise<FileEntry[]>;
  stat(path: string): Promise<FileEntry>;
  exists(path: string): Promise<boolean>;
  mkdir(path: string): Promise<Record<string, unknown>>;
  rename(from: string, to: string): Promise<Record<string, unknown>>;
  remove(path: string, opts?: { recursive?: boolean }): Promise<void>;
  /** Changes under `path` as they happen. */
  watch(path: string, opts?: { recursive?: boolean; signal?: AbortSignal }): AsyncIterableIterator<Record<string, unknown>>;
}

export declare class Command {
  readonly pid: number;
  info: Record<string, unknown>;
  wait(): Promise<number>;
  sendStdin(data: string, opts?: { close?: boolean }): Promise<void>;
  signal(signal?: string | number): Promise<void>;
  kill(): Promise<void>;
  output(opts?: { follow?: boolean; signal?: AbortSignal }): AsyncIterableIterator<Event>;
}

export declare class Commands {
  start(cmd: string, opts?: { cwd?: string; env?: Record<string, string>; timeout?: number }): Promise<Command>;
  list(): Promise<Array<Record<string, unknown>>>;
}
