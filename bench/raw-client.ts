// A raw Cloud Hypervisor API client in a process of its own: the baseline for
// vfiod's overhead. vfiod is a separate process from the doubles, so a raw client
// must be one too, or the baseline would skip the process hop (and, on a loaded
// 2-core machine, the wake-ups) that any client of the API socket pays.
//
// Run as a child with an IPC channel: each message {socket, requests, runs}
// sends the requests in order, `runs` times, over one kept connection per socket,
// and answers {times} (ms per run) or {error}.
import { fork, type ChildProcess } from "node:child_process";
import { Client } from "undici";

export interface RawRequest {
  readonly method: "GET" | "PUT";
  readonly endpoint: string;
  readonly body?: string;
}

interface Job {
  readonly socket: string;
  readonly requests: readonly RawRequest[];
  readonly runs: number;
}

type Answer = { times: number[] } | { error: string };

/** The parent's handle on the child. */
export class RawClientProcess {
  private constructor(private readonly child: ChildProcess) {}

  static start(): RawClientProcess {
    return new RawClientProcess(fork(__filename, [], { stdio: ["ignore", "inherit", "inherit", "ipc"] }));
  }

  /** ms per run of `requests`, each run sent in order over the kept connection. */
  run(socket: string, requests: readonly RawRequest[], runs: number): Promise<number[]> {
    return new Promise((resolve, reject) => {
      this.child.once("message", (answer: Answer) => ("error" in answer ? reject(new Error(answer.error)) : resolve(answer.times)));
      this.child.send({ socket, requests, runs } satisfies Job);
    });
  }

  close(): void {
    this.child.kill();
  }
}

async function serve(): Promise<void> {
  const clients = new Map<string, Client>();
  const clientFor = (socket: string) => {
    let client = clients.get(socket);
    if (client === undefined) {
      client = new Client("http://localhost", { socketPath: socket, keepAliveTimeout: 600_000, keepAliveMaxTimeout: 600_000 });
      clients.set(socket, client);
    }
    return client;
  };
  process.on("message", (job: Job) => {
    const client = clientFor(job.socket);
    const run = async () => {
      const times: number[] = [];
      for (let i = 0; i < job.runs; i++) {
        const started = performance.now();
        for (const r of job.requests) {
          const response = await client.request({ path: `/api/v1/${r.endpoint}`, method: r.method, body: r.body });
          await response.body.text();
          if (response.statusCode >= 300) throw new Error(`raw ${r.method} ${r.endpoint}: HTTP ${response.statusCode}`);
        }
        times.push(performance.now() - started);
      }
      return times;
    };
    run().then(
      (times) => process.send!({ times } satisfies Answer),
      (err: unknown) => process.send!({ error: String(err) } satisfies Answer),
    );
  });
  process.on("disconnect", () => process.exit(0));
}

if (require.main === module) void serve();
