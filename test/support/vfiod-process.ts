// Runs the real vfiod binary (dist/src/main.js, built by `npm test`'s tsc) as a
// child process and waits until it logs that it is serving.
import { spawn, type ChildProcess } from "node:child_process";
import path from "node:path";
import readline from "node:readline";

export const MAIN_JS = path.resolve(__dirname, "../../dist/src/main.js");
export const CLI_JS = path.resolve(__dirname, "../../dist/src/cli.js");
/** What an install of the built server holds beside node_modules (deploy/Containerfile ships these). */
export const INSTALL_PARTS = ["package.json", "dist/src", "dist/gen"] as const;

export interface VfiodProcess {
  readonly child: ChildProcess;
  /** "127.0.0.1:<port>" of the TCP listener. */
  readonly address: string;
  /** Every JSON log line so far. */
  readonly logs: Record<string, unknown>[];
  /** Milliseconds from spawn to the "vfiod serving" log line. */
  readonly servingAfterMs: number;
  /** Resolves with the exit code (or signal name) once the process ends. */
  readonly exited: Promise<number | string>;
  stop(): Promise<number | string>;
}

/**
 * Starts `node MAIN_JS --listen 127.0.0.1:0 ...args`; `command` replaces `node MAIN_JS` (e.g. a
 * wrapper that execs node on another copy of the server).
 */
export async function startVfiod(
  args: string[],
  env: NodeJS.ProcessEnv = {},
  command: readonly string[] = [process.execPath, MAIN_JS],
): Promise<VfiodProcess> {
  const [executable, ...prefix] = command as [string, ...string[]];
  const started = performance.now();
  const child = spawn(executable, [...prefix, "--listen", "127.0.0.1:0", ...args], {
    env: { PATH: process.env.PATH, ...env },
    stdio: ["ignore", "ignore", "pipe"],
  });
  const logs: Record<string, unknown>[] = [];
  const exited = new Promise<number | string>((resolve) =>
    child.once("exit", (code, signal) => resolve(code ?? signal ?? "unknown")),
  );
  let servingAfterMs = 0;
  const port = await new Promise<number>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error("vfiod did not start within 15 s")), 15_000);
    readline.createInterface({ input: child.stderr! }).on("line", (line) => {
      let entry: Record<string, unknown>;
      try {
        entry = JSON.parse(line) as Record<string, unknown>;
      } catch {
        entry = { msg: line };
      }
      logs.push(entry);
      if (entry.msg === "vfiod serving") {
        servingAfterMs = performance.now() - started;
        clearTimeout(timer);
        resolve(Number(entry.port));
      }
    });
    void exited.then((code) => {
      clearTimeout(timer);
      reject(new Error(`vfiod exited (${code}) before serving: ${JSON.stringify(logs)}`));
    });
  });
  return {
    child,
    address: `127.0.0.1:${port}`,
    logs,
    servingAfterMs,
    exited,
    stop: () => {
      if (child.exitCode === null && child.signalCode === null) child.kill("SIGTERM");
      return exited;
    },
  };
}
