// Launches a real QEMU for tests: q35 under TCG (nested KVM here cannot boot a
// guest, qemu-qmp.md §2), a QMP socket, N spare pcie-root-ports. Every VM is
// killed and its directory removed by stop()/stopAllQemu(), and on process exit.
import { type ChildProcess, spawn } from "node:child_process";
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import type { VmRecord } from "../../src/inventory/vm";
import { commandRuns } from "./skip";

const QEMU = "qemu-system-x86_64";
const START_TIMEOUT_MS = 15_000;

/**
 * Whether QEMU can run here; when not, says why so skipped tests are explained.
 * @throws in CI when it cannot (./skip.ts).
 */
export function qemuAvailable(): boolean {
  return commandRuns(QEMU, ["--version"], "real-QEMU tests");
}

export interface QemuVmOptions {
  /** pcie-root-ports rp1..rpN (default 2). */
  readonly rootPorts?: number;
  /** Extra arguments: "-S" for prelaunch, "-device e1000e,id=nic1,bus=rp1", ... */
  readonly args?: readonly string[];
}

export interface QemuVm {
  /** A VM record for the backend, named after the test's VM. */
  readonly record: VmRecord;
  readonly socket: string;
  /** Kills QEMU, leaving its socket file behind as a crash would. */
  kill(): Promise<void>;
  /** Kills QEMU and removes its directory. */
  stop(): Promise<void>;
}

const live = new Set<QemuVm>();
const children = new Set<ChildProcess>();
process.on("exit", () => children.forEach((child) => child.kill("SIGKILL")));

export async function startQemu(options: QemuVmOptions = {}): Promise<QemuVm> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "vfiod-"));
  const socket = path.join(dir, "qmp.sock");
  const ports = Array.from({ length: options.rootPorts ?? 2 }, (_, i) => [
    "-device",
    `pcie-root-port,id=rp${i + 1},bus=pcie.0,chassis=${i + 1},slot=${i + 1}`,
  ]).flat();
  const args = ["-display", "none", "-nodefaults", "-no-user-config", "-machine", "q35", "-accel", "tcg", "-m", "128"];
  const child = spawn(QEMU, [...args, "-qmp", `unix:${socket},server=on,wait=off`, ...ports, ...(options.args ?? [])], {
    stdio: ["ignore", "ignore", "pipe"],
  });
  children.add(child);
  let stderr = "";
  child.stderr?.setEncoding("utf8").on("data", (chunk: string) => (stderr += chunk));
  const exited = new Promise<void>((resolve) => child.once("exit", () => resolve()));

  const kill = async (): Promise<void> => {
    if (child.exitCode === null && child.signalCode === null) child.kill("SIGKILL");
    await exited;
    children.delete(child);
  };
  const remove = async (): Promise<void> => {
    await kill();
    fs.rmSync(dir, { recursive: true, force: true });
  };
  try {
    await waitForGreeting(socket, exited, () => stderr);
  } catch (err) {
    await remove();
    throw err;
  }
  const name = path.basename(dir);
  const vm: QemuVm = {
    record: { id: name, name, hypervisor: "qemu", socket, source: "inventory" },
    socket,
    kill,
    async stop() {
      live.delete(vm);
      await remove();
    },
  };
  live.add(vm);
  return vm;
}

export async function stopAllQemu(): Promise<void> {
  await Promise.all([...live].map((vm) => vm.stop()));
}

/** Connects until QEMU greets, then leaves so the monitor is free for the test (one client at a time, §1). */
async function waitForGreeting(socket: string, exited: Promise<void>, stderr: () => string): Promise<void> {
  let gone = false;
  void exited.then(() => (gone = true));
  const deadline = Date.now() + START_TIMEOUT_MS;
  while (Date.now() < deadline) {
    if (gone) throw new Error(`${QEMU} exited at start: ${stderr().trim()}`);
    if (await greets(socket)) return;
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
  throw new Error(`${QEMU} did not greet on its QMP socket within ${START_TIMEOUT_MS} ms: ${stderr().trim()}`);
}

function greets(socket: string): Promise<boolean> {
  return new Promise((resolve) => {
    const conn = net.createConnection(socket);
    const done = (ok: boolean): void => {
      conn.destroy();
      resolve(ok);
    };
    conn.setEncoding("utf8");
    conn.on("data", (chunk: string) => done(chunk.includes('"QMP"')));
    conn.on("error", () => done(false));
    conn.on("close", () => done(false));
  });
}
