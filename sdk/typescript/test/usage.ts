// Type-checked by scripts/check-ts-package.sh against the packed package (not run).
import { Client, Execution, ForkboxError, NotFound, Sandbox, type Event, type Port } from "forkbox";

export async function usage(): Promise<void> {
  const client = new Client({ baseUrl: "http://127.0.0.1:7070", apiKey: "fbx_x", timeoutMs: 10_000 });
  const sb: Sandbox = await Sandbox.create({ client, template: "python", memoryMb: 512, metadata: { a: "b" } });
  const r: Execution = await sb.runCode("print(1)", { language: "python", timeout: 5 });
  const code: number = r.exitCode;
  for await (const ev of sb.runCodeStream("print(2)")) {
    const e: Event = ev;
    if (e.type === "stdout") console.log(e.seq, e.data);
  }
  const x = await sb.exec("ls", { cwd: "/root", env: { A: "1" } });
  console.log(x.stdout, x.stderr, code);
  await sb.files.write("/root/a", "text");
  const bytes: Uint8Array = await sb.files.read("/root/a");
  const kids: Sandbox[] = await sb.fork(2);
  await sb.mergeInto(kids[0]);
  const ctx = await sb.createContext();
  const ran = await ctx.run("1 + 1", { timeout: 5 });
  console.log(ran.results[0]?.["text/plain"], ran.error, ran.exitCode);
  await ctx.close();
  const js = await sb.createContext({ language: "javascript", cwd: "/tmp" });
  const inCtx: Execution = await sb.runCode("1 + 1", { context: js });
  console.log(js.language, inCtx.stdout);
  const ports: Port[] = await sb.ports();
  console.log(bytes.length, ports.map((p) => p.port), sb.portUrl(8000, "/"));
  await sb.pause();
  await sb.resume();
  const cmd = await sb.commands.start("sleep 1");
  console.log(await cmd.wait());
  try {
    await Sandbox.connect("sbx-0000000000000000", { client });
  } catch (e) {
    if (e instanceof NotFound || e instanceof ForkboxError) console.log(e.status, e.code);
  }
  await sb.kill();
}
