// cocoon's per-VM ops lock (../shared/reference/cocoon.md A.2) held by a REAL other
// process (util-linux flock(1), as cocoon's flock would be): withOpsFlock waits, gives up
// with VM_BUSY when its signal aborts, never runs its function while the other process
// holds the lock, and runs it once released; and over real gRPC, an Attach to a cocoon VM
// whose ops.lock is held never reaches Cloud Hypervisor.
import * as grpc from "@grpc/grpc-js";
import { type ChildProcessWithoutNullStreams, spawn, spawnSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { AuditLog } from "../../src/audit";
import { Code } from "../../src/errors";
import { withOpsFlock } from "../../src/service/ops-flock";
import { ChDouble } from "../support/ch-double";
import { buildFakeSysfs, type FakeSysfs } from "../support/fake-sysfs";
import { readAuditLog } from "../support/log-capture";
import { vfiodRejection } from "../support/rejection";
import { commandRuns } from "../support/skip";
import { failure, startTestServer, type TestServer } from "../support/test-server";
import { waitFor } from "../support/wait";

const describeFlock = commandRuns("flock", ["--version"], "ops flock tests (flock(1) is util-linux's)") ? describe : describe.skip;

interface Holder {
  /** Lets the other process go; resolves once it has exited, its lock released by the kernel. */
  release(): Promise<void>;
  /** Whether release() was asked for: until then the other process holds the lock. */
  readonly releasing: boolean;
}

const holders: ChildProcessWithoutNullStreams[] = [];

/**
 * Another process holding an exclusive flock on `file` until released: flock(1) takes
 * the lock, then runs a shell that says so and waits for its stdin to close.
 */
async function holdFlock(file: string): Promise<Holder> {
  const child = spawn("flock", ["--exclusive", "--close", file, "-c", "echo held; read line"]);
  holders.push(child);
  const exited = new Promise<void>((resolve) => child.once("exit", () => resolve()));
  await new Promise<void>((resolve, reject) => {
    child.stdout.once("data", () => resolve());
    child.once("error", reject);
    child.once("exit", (code) => reject(new Error(`flock exited ${code} before it held ${file}`)));
  });
  let releasing = false;
  return {
    get releasing() {
      return releasing;
    },
    async release() {
      releasing = true;
      child.stdin.end();
      await exited;
    },
  };
}

/** Whether a third process could take the lock now, exclusive or `shared` (flock --nonblock exits 1 when it cannot). */
function lockIsFree(file: string, mode: "exclusive" | "shared" = "exclusive"): boolean {
  const probe = spawnSync("flock", [`--${mode}`, "--nonblock", file, "true"]);
  if (probe.status !== 0 && probe.status !== 1) throw new Error(`flock probe failed: ${probe.error?.message ?? probe.status}`);
  return probe.status === 0;
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));
/** --hypervisor-timeout of the gRPC tests' vfiod: also its bound on waiting for cocoon's ops.lock. */
const HYPERVISOR_TIMEOUT_MS = 1500;

let dir: string;
beforeEach(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "vfiod-flock-"));
});
afterEach(async () => {
  // Processes this file started, by their own handle; none outlives its test.
  for (const child of holders.splice(0)) {
    if (child.exitCode !== null || child.signalCode !== null) continue;
    const exited = new Promise((resolve) => child.once("exit", resolve));
    child.stdin.end();
    child.kill();
    await exited;
  }
  fs.rmSync(dir, { recursive: true, force: true });
});

describeFlock("withOpsFlock against another process holding the lock", () => {
  const lockFile = () => path.join(dir, "ops.lock");

  test("waits while the other process holds it, runs fn only once released, holding the lock itself meanwhile", async () => {
    const holder = await holdFlock(lockFile());
    expect(lockIsFree(lockFile())).toBe(false);
    const seen: { releasing: boolean; freeInside: boolean; sharedInside: boolean }[] = [];
    const running = withOpsFlock(lockFile(), "busy-vm", AbortSignal.timeout(30_000), 30_000, async () => {
      seen.push({
        releasing: holder.releasing,
        freeInside: lockIsFree(lockFile()),
        sharedInside: lockIsFree(lockFile(), "shared"),
      });
      return "ran";
    });
    await sleep(400);
    expect(seen).toEqual([]); // still waiting after 400 ms
    await holder.release();
    await expect(running).resolves.toBe("ran");
    // fn ran once, only after the other process was let go, with the lock held exclusively (by withOpsFlock).
    expect(seen).toEqual([{ releasing: true, freeInside: false, sharedInside: false }]);
    expect(lockIsFree(lockFile())).toBe(true); // released on return; the file stays
    expect(fs.existsSync(lockFile())).toBe(true);
  });

  test.each([
    ["its deadline passes", () => AbortSignal.timeout(300)],
    // A caller with no deadline: vfiod's own bound (--hypervisor-timeout) ends the wait.
    ["vfiod's own bound passes", () => new AbortController().signal, 300],
    [
      "its caller cancels",
      () => {
        const cancel = new AbortController();
        setTimeout(() => cancel.abort(), 300);
        return cancel.signal;
      },
    ],
  ] as [string, () => AbortSignal, number?][])("gives up with VM_BUSY (ABORTED) when %s, never running fn", async (_when, makeSignal, maxWaitMs = 30_000) => {
    const holder = await holdFlock(lockFile());
    const fn = jest.fn(async () => "ran");
    const started = Date.now();
    const err = await vfiodRejection(withOpsFlock(lockFile(), "busy-vm", makeSignal(), maxWaitMs, fn));
    expect(Date.now() - started).toBeGreaterThanOrEqual(290); // it waited for the signal
    expect(err).toMatchObject({ reason: "VM_BUSY", code: Code.ABORTED, meta: { vm: "busy-vm" } });
    expect(err.message).toContain("VM busy-vm is locked by another cocoon operation");
    expect(fn).not.toHaveBeenCalled();
    // Giving up left no lock behind: once the other process goes, the lock is free.
    await holder.release();
    expect(lockIsFree(lockFile())).toBe(true);
    expect(fn).not.toHaveBeenCalled();
  });
});

describeFlock("Attach to a cocoon VM whose ops.lock another process holds, over real gRPC", () => {
  const VM_ID = "K7Q2MZ4XW3ABCDEFGHJ2345677";
  const PID = 4242;
  const GPU = "0000:01:00.0";
  let sysfs: FakeSysfs;
  let ch: ChDouble;
  let server: TestServer;
  let runDir: string;
  let auditFile: string;

  beforeEach(async () => {
    // A cocoon root with one running Cloud Hypervisor VM (vms.json, pid file) and a fake /proc for its process.
    const root = path.join(dir, "cocoon");
    runDir = path.join(root, "run", "cloudhypervisor", VM_ID);
    fs.mkdirSync(path.join(root, "cloudhypervisor", "db"), { recursive: true });
    fs.mkdirSync(runDir, { recursive: true });
    const record = { id: VM_ID, state: "running", config: { name: "busy-vm" }, pid: PID, run_dir: runDir };
    fs.writeFileSync(
      path.join(root, "cloudhypervisor", "db", "vms.json"),
      JSON.stringify({ vms: { [VM_ID]: record }, names: { "busy-vm": VM_ID } }),
    );
    fs.writeFileSync(path.join(runDir, "ch.pid"), `${PID}\n`);
    const socket = path.join(runDir, "api.sock");
    const procRoot = path.join(dir, "proc");
    fs.mkdirSync(path.join(procRoot, String(PID)), { recursive: true });
    fs.symlinkSync("/usr/bin/cloud-hypervisor", path.join(procRoot, String(PID), "exe"));
    fs.writeFileSync(path.join(procRoot, String(PID), "cmdline"), `cloud-hypervisor\0--api-socket\0path=${socket}\0`);

    sysfs = buildFakeSysfs([{ bdf: GPU, driver: "vfio-pci", group: 12 }]);
    ch = await ChDouble.start(socket, { sysfsRoot: sysfs.root });
    ch.setState("Running");
    auditFile = path.join(dir, "audit.jsonl");
    server = await startTestServer({
      cocoonRoot: root,
      procRoot,
      sysfsRoot: sysfs.root,
      hypervisorTimeoutMs: HYPERVISOR_TIMEOUT_MS,
      server: { audit: AuditLog.open(auditFile) },
    });
  });

  afterEach(async () => {
    await server.stop();
    await ch.close();
    sysfs.cleanup();
  });

  const addDevices = () => ch.requests.filter((r) => r.endpoint === "vm.add-device");

  test("Attach with no deadline waits for the lock at most --hypervisor-timeout, then answers VM_BUSY; CH gets no add-device", async () => {
    const holder = await holdFlock(path.join(runDir, "ops.lock"));
    const started = Date.now();
    const failed = await failure(server.client.attach({ vm: "busy-vm", pci: GPU, id: "gpu0" }));
    const elapsed = Date.now() - started;
    expect(elapsed).toBeGreaterThanOrEqual(HYPERVISOR_TIMEOUT_MS - 50);
    expect(elapsed).toBeLessThan(HYPERVISOR_TIMEOUT_MS + 5000);
    expect({ code: failed.code, reason: failed.reason }).toEqual({ code: grpc.status.ABORTED, reason: "VM_BUSY" });
    expect(addDevices()).toEqual([]);
    await holder.release();
  });
  const audited = () => readAuditLog(auditFile);

  test("Attach with a 1 s deadline waits for the lock, then answers ABORTED (VM_BUSY) before the deadline; CH gets no add-device", async () => {
    // The VM resolves and its CH answers: only the lock stands in the way.
    expect((await server.client.list({ vm: "busy-vm" })).devices).toEqual([]);
    const holder = await holdFlock(path.join(runDir, "ops.lock"));

    const started = Date.now();
    const failed = await failure(server.client.attach({ vm: "busy-vm", pci: GPU, id: "gpu0" }, { timeoutMs: 1000 }));
    const elapsed = Date.now() - started;
    // It waited for the lock nearly to the deadline, and gave up in time for its answer to arrive.
    expect(elapsed).toBeGreaterThanOrEqual(750);
    expect({ code: failed.code, reason: failed.reason }).toEqual({ code: grpc.status.ABORTED, reason: "VM_BUSY" });
    expect(failed.message).toContain("busy-vm");
    await waitFor(() => audited().some((e) => e.method === "Attach"), "vfiod answers the Attach");
    expect(audited().find((e) => e.method === "Attach")).toMatchObject({ method: "Attach", vm: VM_ID, vmName: "busy-vm", outcome: "VM_BUSY", code: grpc.status.ABORTED });
    expect(addDevices()).toEqual([]);

    // Once the other process lets go, the same Attach goes through.
    await holder.release();
    const { device } = await server.client.attach({ vm: "busy-vm", pci: GPU, id: "gpu0" }, { timeoutMs: 10_000 });
    expect(device).toMatchObject({ id: "gpu0", bdf: GPU });
    expect(addDevices()).toHaveLength(1);
  });
});
