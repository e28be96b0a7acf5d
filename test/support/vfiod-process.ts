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
  /** "127.0.0.1:<port>" of the TCP listener; "" when it has none (--listen none). */
  readonly address: string;
  /** Milliseconds from spawn to the "vfiod serving" log line. */
  readonly servingAfterMs: number;
  /** Every JSON log line so far. */
  readonly logs: Record<string, unknown>[];
  /** Resolves with the exit code (or signal name) once the process ends. */
  readonly exited: Promise<number | string>;
  stop(): Promise<number | string>;
}

export interface StartOptions {
  /** false: pass no `--listen 127.0.0.1:0` first, so VFIOD_LISTEN or the process's default applies. */
  readonly ephemeralListen?: boolean;
  /** Runs it as another user (root only). */
  readonly as?: { readonly uid: number; readonly gid: number };
  /** Replaces `node MAIN_JS` (e.g. a wrapper that execs node on another copy of the server). */
  readonly command?: readonly string[];
}

/** Starts `node MAIN_JS --listen 127.0.0.1:0 ...args` and waits for it to log that it serves. */
export async function startVfiod(args: string[], env: NodeJS.ProcessEnv = {}, options: StartOptions = {}): Promise<VfiodProcess> {
  const listen = options.ephemeralListen === false ? [] : ["--listen", "127.0.0.1:0"];
  const [executable, ...prefix] = (options.command ?? [process.execPath, MAIN_JS]) as [string, ...string[]];
  const started = performance.now();
  const child = spawn(executable, [...prefix, ...listen, ...args], {
    env: { PATH: process.env.PATH, ...env },
    stdio: ["ignore", "ignore", "pipe"],
    ...options.as,
  });
  const logs: Record<string, unknown>[] = [];
  const exited = new Promise<number | string>((resolve) =>
    child.once("exit", (code, signal) => resolve(code ?? signal ?? "unknown")),
  );
  let servingAfterMs = 0;
  const port = await new Promise<number | undefined>((resolve, reject) => {
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
        clearTimeout(timer);
        servingAfterMs = performance.now() - started;
        resolve(entry.port === undefined ? undefined : Number(entry.port));
      }
    });
    void exited.then((code) => {
      clearTimeout(timer);
      reject(new Error(`vfiod exited (${code}) before serving: ${JSON.stringify(logs)}`));
    });
  });
  return {
    child,
    address: port === undefined ? "" : `127.0.0.1:${port}`,
    servingAfterMs,
    logs,
    exited,
    stop: () => {
      if (child.exitCode === null && child.signalCode === null) child.kill("SIGTERM");
      return exited;
    },
  };
}

export interface VfiodRun {
  /** Exit code, signal name, or "running" when it was still running at the time limit (then killed). */
  readonly exit: number | string;
  readonly logs: Record<string, unknown>[];
  readonly stderr: string;
}

/**
 * Runs the real vfiod binary with exactly `args` (no default --listen) and waits
 * for it to exit, for a start that must fail; kills it after `timeoutMs`.
 */
export async function runVfiodToExit(args: string[], env: NodeJS.ProcessEnv = {}, timeoutMs = 15_000): Promise<VfiodRun> {
  const child = spawn(process.execPath, [MAIN_JS, ...args], {
    env: { PATH: process.env.PATH, ...env },
    stdio: ["ignore", "ignore", "pipe"],
  });
  let stderr = "";
  child.stderr!.setEncoding("utf8").on("data", (chunk: string) => (stderr += chunk));
  const timer = setTimeout(() => child.kill("SIGKILL"), timeoutMs);
  const exit = await new Promise<number | string>((resolve) =>
    child.once("exit", (code, signal) => resolve(signal === "SIGKILL" ? "running" : (code ?? signal ?? "unknown"))),
  );
  clearTimeout(timer);
  const logs = stderr
    .split("\n")
    .filter((line) => line.startsWith("{"))
    .map((line) => JSON.parse(line) as Record<string, unknown>);
  return { exit, logs, stderr };
}
