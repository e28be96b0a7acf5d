// The built vfiod server (dist/src/main.js) as its own process, the way it runs
// on a host: its startup time, memory and CPU are its own, apart from the bench's
// doubles and clients. Optionally with the inspector (to run a GC before reading
// memory) or --cpu-prof (BENCH_CPU_PROF=<dir>). Unlike the tests' startVfiod
// (test/support/vfiod-process.ts), it parses and keeps only the log lines it
// needs: 20,000 calls would otherwise make the bench's own work part of the measure.
import * as grpc from "@grpc/grpc-js";
import { spawn, type ChildProcess } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import readline from "node:readline";
import { WebSocket } from "undici";
import { createDeviceClient, type DeviceClient } from "../src/grpc/client";

export const MAIN_JS = path.resolve(__dirname, "../src/main.js");

export interface SpawnOptions {
  /** Extra flags after --listen. */
  readonly args: readonly string[];
  /** Start with the inspector on a free loopback port, so gc() works. */
  readonly inspect?: boolean;
  /** A label for the --cpu-prof file when BENCH_CPU_PROF is set. */
  readonly label?: string;
}

export class VfiodProcess {
  readonly client: DeviceClient;
  /** A kept channel for health checks, as `client` is for DeviceService. */
  private readonly healthClient: grpc.Client;
  private exited: Promise<unknown>;

  private constructor(
    readonly label: string,
    readonly child: ChildProcess,
    readonly address: string,
    private readonly inspectorUrl: string | undefined,
    /** warn/error/fatal log lines seen (the bench prints them). */
    readonly problems: string[],
  ) {
    this.client = createDeviceClient(address);
    this.healthClient = new grpc.Client(address, grpc.credentials.createInsecure());
    this.exited = new Promise((resolve) => (child.exitCode !== null ? resolve(undefined) : child.once("exit", resolve)));
  }

  static async start(options: SpawnOptions): Promise<VfiodProcess> {
    const nodeArgs: string[] = [];
    if (options.inspect) nodeArgs.push("--inspect=127.0.0.1:0");
    const profDir = process.env.BENCH_CPU_PROF;
    if (profDir !== undefined && profDir !== "") {
      fs.mkdirSync(profDir, { recursive: true });
      nodeArgs.push("--cpu-prof", `--cpu-prof-dir=${path.resolve(profDir)}`, `--cpu-prof-name=vfiod-${options.label ?? "bench"}-${Date.now()}.cpuprofile`);
    }
    const child = spawn(process.execPath, [...nodeArgs, MAIN_JS, "--listen", "127.0.0.1:0", ...options.args], {
      // As deploy/vfiod.service and the container image run it (the unit says why).
      env: { PATH: process.env.PATH, MALLOC_ARENA_MAX: "2" },
      stdio: ["ignore", "ignore", "pipe"],
    });
    const problems: string[] = [];
    let inspectorUrl: string | undefined;
    const port = await new Promise<number>((resolve, reject) => {
      // A vfiod that never serves must not outlive the bench.
      const timer = setTimeout(() => {
        child.kill("SIGKILL");
        reject(new Error("vfiod did not start within 15 s"));
      }, 15_000);
      child.once("exit", (code, signal) => {
        clearTimeout(timer);
        reject(new Error(`vfiod exited (${code ?? signal}) before serving: ${problems.join("\n")}`));
      });
      // Every line is read (a synchronous logger must never block on a full pipe);
      // only the few that matter are parsed.
      readline.createInterface({ input: child.stderr! }).on("line", (line) => {
        if (line.startsWith("Debugger listening on ")) inspectorUrl = line.slice("Debugger listening on ".length).trim();
        if (/"level":"(warn|error|fatal)"/.test(line)) problems.push(line.slice(0, 500));
        if (line.includes('"msg":"vfiod serving"')) {
          clearTimeout(timer);
          resolve(Number((JSON.parse(line) as { port: number }).port));
        }
      });
    });
    return new VfiodProcess(options.label ?? "bench", child, `127.0.0.1:${port}`, inspectorUrl, problems);
  }

  get pid(): number {
    return this.child.pid ?? 0;
  }

  /** A memory field of /proc/<pid>/status ("VmRSS", "RssAnon", "RssFile"), in MB (10^6 bytes). */
  memoryMB(field = "VmRSS"): number {
    return statusMB(this.pid, field);
  }

  /** A full GC in the process (through the inspector), then its process.memoryUsage() once RSS has settled. */
  async gc(): Promise<NodeJS.MemoryUsage> {
    if (this.inspectorUrl === undefined) throw new Error("started without inspect: no gc()");
    const socket = new WebSocket(this.inspectorUrl);
    await new Promise((resolve, reject) => {
      socket.addEventListener("open", resolve, { once: true });
      socket.addEventListener("error", reject, { once: true });
    });
    let nextId = 1;
    const pending = new Map<number, (reply: { result?: unknown; error?: unknown }) => void>();
    socket.onmessage = (event) => {
      const reply = JSON.parse(String(event.data)) as { id?: number; result?: unknown; error?: unknown };
      if (reply.id !== undefined) pending.get(reply.id)?.(reply);
    };
    const send = (method: string, params: unknown = {}) =>
      new Promise<{ result?: unknown; error?: unknown }>((resolve) => {
        const id = nextId++;
        pending.set(id, resolve);
        socket.send(JSON.stringify({ id, method, params }));
      });
    try {
      // Twice: the first pass frees what only weak references and finalizers held.
      await send("HeapProfiler.collectGarbage");
      await send("HeapProfiler.collectGarbage");
      // V8 returns freed pages to the OS from a background thread, shortly after.
      await new Promise((resolve) => setTimeout(resolve, 300));
      const reply = await send("Runtime.evaluate", { expression: "JSON.stringify(process.memoryUsage())", returnByValue: true });
      const value = (reply.result as { result?: { value?: string } } | undefined)?.result?.value;
      if (value === undefined) throw new Error(`inspector: ${JSON.stringify(reply)}`);
      return JSON.parse(value) as NodeJS.MemoryUsage;
    } finally {
      socket.close();
    }
  }

  /** grpc.health.v1.Health/Check on a new channel: "SERVING" or what else it says. */
  static async health(address: string): Promise<string> {
    const client = new grpc.Client(address, grpc.credentials.createInsecure());
    try {
      return await checkHealth(client);
    } finally {
      client.close();
    }
  }

  /** The same on the kept channel (a gRPC round trip that does no work). */
  health(): Promise<string> {
    return checkHealth(this.healthClient);
  }

  /** SIGTERM, and wait for the exit (it drains; --cpu-prof writes its profile then). */
  async stop(): Promise<void> {
    this.client.close();
    this.healthClient.close();
    if (this.child.exitCode === null && this.child.signalCode === null) this.child.kill("SIGTERM");
    await this.exited;
  }
}

/** grpc.health.v1.Health/Check for the whole server (service ""). */
function checkHealth(client: grpc.Client): Promise<string> {
  return new Promise<string>((resolve, reject) =>
    client.makeUnaryRequest(
      "/grpc.health.v1.Health/Check",
      (b: Buffer) => b,
      (b: Buffer) => b,
      Buffer.alloc(0),
      { deadline: Date.now() + 5000 },
      (err, res) => {
        // HealthCheckResponse { status = 1 (SERVING) }: field 1, varint 1.
        if (err || res === undefined) reject(err ?? new Error("no health reply"));
        else resolve(res.equals(Buffer.from([8, 1])) ? "SERVING" : `status bytes ${res.toString("hex")}`);
      },
    ),
  );
}

/** A memory field of /proc/<pid>/status ("VmRSS", ...), given in kB there, in MB (10^6 bytes). */
export function statusMB(pid: number, field: string): number {
  const status = fs.readFileSync(`/proc/${pid}/status`, "utf8");
  return (Number(new RegExp(`^${field}:\\s+(\\d+) kB`, "m").exec(status)?.[1]) * 1024) / 1e6;
}
