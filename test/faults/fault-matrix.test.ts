// The fault matrix: every way a hypervisor (or vfiod itself) can fail mid-call
// ends with a clear gRPC status within the call's deadline, and a List
// afterwards says what the hypervisor really holds, read straight from it.
// Through real gRPC to a real vfiod (in-process server, or the real process
// for the SIGKILL case), against the Cloud Hypervisor and QMP doubles and a
// real QEMU. The measured matrix is printed at the end.
import * as grpc from "@grpc/grpc-js";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { Writable } from "node:stream";
import pino from "pino";
import { AuditLog, type AuditEntry } from "../../src/audit";
import { createDeviceClient, type DeviceClient } from "../../src/grpc/client";
import type { Logger } from "../../src/log";
import { ChDouble } from "../support/ch-double";
import { buildFakeSysfs, type FakeSysfs } from "../support/fake-sysfs";
import { checkHealth } from "../support/grpc-clients";
import { chHolds, qmpHolds, refusingSocketFile, type HeldDevice } from "../support/hypervisor-truth";
import { QmpDouble } from "../support/qmp-double";
import { qemuAvailable, startQemu, stopAllQemu } from "../support/qemu-vm";
import { failure, startTestServer, type TestServer } from "../support/test-server";
import { startVfiod, type VfiodProcess } from "../support/vfiod-process";
import { waitFor } from "../support/wait";

/** Deadline of calls that must fail fast (not by running out of time). */
const FAST_MS = 5_000;
/** Deadline of calls that must run out of time. */
const SHORT_MS = 1_000;
/**
 * The latest an answer due at the SHORT_MS deadline may come: 4x, for a loaded 2-core
 * machine (the lab beside the tests). Cases assert order and outcome; this only says "not stuck".
 */
const DUE_AT_DEADLINE_MS = 4 * SHORT_MS;

const GPU = "0000:01:00.0";
const AUDIO = "0000:01:00.1";
const sysfsPath = (bdf: string) => `/sys/bus/pci/devices/${bdf}`;

interface Row {
  readonly name: string;
  readonly status: string;
  readonly reason: string;
  readonly ms: number;
}
const matrix: Row[] = [];

let root: string;
let auditFile: string;
let audit: AuditLog;
let cleanups: (() => Promise<unknown> | void)[] = [];

beforeAll(() => {
  root = fs.mkdtempSync(path.join(os.tmpdir(), "vfiod-faults-"));
  auditFile = path.join(root, "audit.jsonl");
  audit = AuditLog.open(auditFile);
});

afterEach(async () => {
  for (const cleanup of cleanups.reverse()) await cleanup();
  cleanups = [];
});

afterAll(async () => {
  await stopAllQemu();
  fs.rmSync(root, { recursive: true, force: true });
  const lines = [
    "| case | status | reason | time to answer (ms) |",
    "|---|---|---|---|",
    ...matrix.map((r) => `| ${r.name} | ${r.status} | ${r.reason} | ${r.ms} |`),
  ];
  console.log(`fault matrix (deadline ${SHORT_MS} ms for the timeout cases, ${FAST_MS} ms otherwise)\n${lines.join("\n")}`);
});

// ---- helpers ----

interface Failed {
  readonly code: number;
  readonly reason: string | undefined;
  readonly message: string;
  readonly ms: number;
}

/** Runs a call that must fail; its code, ErrorInfo reason, message and time to answer. */
async function timedFailure(call: () => Promise<unknown>): Promise<Failed> {
  const started = performance.now();
  const failed = await failure(call());
  return { ...failed, ms: Math.round(performance.now() - started) };
}

/** `server`: what the server itself recorded, for answers the client made up (its own deadline, a dropped connection). */
function record(name: string, failed: Failed, server?: string): void {
  const reason = failed.reason ?? `none (client-side status)${server === undefined ? "" : `; server: ${server}`}`;
  matrix.push({ name, status: grpc.status[failed.code] ?? String(failed.code), reason, ms: failed.ms });
}

/** A logger whose JSON lines a test can read. */
function capturedLogger(): { log: Logger; lines: Record<string, unknown>[] } {
  const lines: Record<string, unknown>[] = [];
  const sink = new Writable({
    write(chunk: Buffer, _encoding, done) {
      for (const line of chunk.toString("utf8").split("\n")) if (line !== "") lines.push(JSON.parse(line));
      done();
    },
  });
  return { log: pino({ level: "info" }, sink), lines };
}


/** The audit line of the Attach to `vm`: what the server itself answered, and after how long. */
async function serverAnswer(vm: string): Promise<AuditEntry> {
  let entry: AuditEntry | undefined;
  await waitFor(() => {
    const lines = fs.existsSync(auditFile) ? fs.readFileSync(auditFile, "utf8").split("\n") : [];
    entry = lines
      .filter((line) => line !== "")
      .map((line) => JSON.parse(line) as AuditEntry)
      .find((e) => e.vm === vm && e.method === "Attach");
    return entry !== undefined;
  }, `the server answers the Attach to ${vm}`);
  return entry!;
}

function tempDir(): string {
  const dir = fs.mkdtempSync(path.join(root, "case-"));
  cleanups.push(() => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
}

function fakeSysfs(): FakeSysfs {
  const sysfs = buildFakeSysfs([
    { bdf: GPU, driver: "vfio-pci", group: 12 },
    { bdf: AUDIO, driver: "vfio-pci", group: 12 },
  ]);
  cleanups.push(() => sysfs.cleanup());
  return sysfs;
}

function writeInventory(dir: string, vm: { name: string; hypervisor: string; socket: string }): string {
  const file = path.join(dir, "inventory.json");
  fs.writeFileSync(file, JSON.stringify({ vms: [vm] }));
  return file;
}

async function startCh(socket: string, sysfs: FakeSysfs): Promise<ChDouble> {
  const double = await ChDouble.start(socket, { sysfsRoot: sysfs.root });
  double.setState("Running");
  cleanups.push(() => double.close());
  return double;
}

/** One Cloud Hypervisor VM `name` in the inventory, its API socket (not yet served), and a vfiod serving it. */
async function chSetup(
  name: string,
  log?: Logger,
): Promise<{ dir: string; socket: string; sysfs: FakeSysfs; server: TestServer }> {
  const dir = tempDir();
  const sysfs = fakeSysfs();
  const socket = path.join(dir, "ch.sock");
  const inventoryFile = writeInventory(dir, { name, hypervisor: "cloud-hypervisor", socket });
  const server = await startTestServer({ inventoryFile, sysfsRoot: sysfs.root, server: { audit }, log });
  cleanups.push(() => server.stop());
  return { dir, socket, sysfs, server };
}

const addDevices = (double: ChDouble) => double.requests.filter((r) => r.endpoint === "vm.add-device");

/** vfiod's List of `vm`, in the shape the hypervisor readers give. */
async function listed(client: DeviceClient, vm: string, withGuestBdf = true): Promise<Partial<HeldDevice>[]> {
  const { devices } = await client.list({ vm }, { timeoutMs: 10_000 });
  return devices.map((d) => (withGuestBdf ? { id: d.id, bdf: d.bdf, guestBdf: d.guestBdf } : { id: d.id, bdf: d.bdf }));
}

/** List equals what Cloud Hypervisor holds; returns it. */
async function expectListMatchesCh(client: DeviceClient, vm: string, socket: string): Promise<HeldDevice[]> {
  const held = await chHolds(socket);
  expect(await listed(client, vm)).toEqual(held);
  return held;
}

// ---- Cloud Hypervisor ----

test("1. CH API socket missing: UNAVAILABLE (HYPERVISOR_UNAVAILABLE) at once; serves again once CH is there", async () => {
  const { socket, sysfs, server } = await chSetup("f1");
  expect(fs.existsSync(socket)).toBe(false);

  const failed = await timedFailure(() => server.client.list({ vm: "f1" }, { timeoutMs: FAST_MS }));
  record("1. CH API socket missing", failed);
  expect(failed).toMatchObject({ code: grpc.status.UNAVAILABLE, reason: "HYPERVISOR_UNAVAILABLE" });
  expect(failed.message).toContain("api socket does not exist");
  expect(failed.message).not.toContain(socket); // the path stays out of caller-visible text
  expect(failed.ms).toBeLessThan(FAST_MS);

  const ch = await startCh(socket, sysfs);
  await server.client.attach({ vm: "f1", pci: GPU, id: "gpu0" }, { timeoutMs: FAST_MS });
  expect(await expectListMatchesCh(server.client, "f1", socket)).toEqual([
    { id: "gpu0", bdf: GPU, guestBdf: expect.stringMatching(/^0000:00:/) },
  ]);
  expect(addDevices(ch)).toHaveLength(1);
});

test("2. CH connection refused (socket file, nobody listening): UNAVAILABLE at once", async () => {
  const { socket, sysfs, server } = await chSetup("f2");
  await refusingSocketFile(socket);

  const failed = await timedFailure(() => server.client.attach({ vm: "f2", pci: GPU, id: "gpu0" }, { timeoutMs: FAST_MS }));
  record("2. CH connection refused", failed);
  expect(failed).toMatchObject({ code: grpc.status.UNAVAILABLE, reason: "HYPERVISOR_UNAVAILABLE" });
  expect(failed.message).toContain("connection refused");
  expect(failed.ms).toBeLessThan(FAST_MS);

  // CH restarts on the same path: nothing was attached.
  fs.rmSync(socket);
  const ch = await startCh(socket, sysfs);
  expect(await expectListMatchesCh(server.client, "f2", socket)).toEqual([]);
  expect(addDevices(ch)).toEqual([]);
});

test("3. CH hangs on vm.info: DEADLINE_EXCEEDED at the deadline, and no add-device is sent", async () => {
  const { socket, sysfs, server } = await chSetup("f3");
  const ch = await startCh(socket, sysfs);
  ch.inject("vm.info", { kind: "hang" });

  const failed = await timedFailure(() => server.client.attach({ vm: "f3", pci: GPU, id: "gpu0" }, { timeoutMs: SHORT_MS }));
  const answered = await serverAnswer("f3");
  record("3. CH hangs (vm.info)", failed, `${answered.outcome} (code ${grpc.status[answered.code]}) after ${answered.ms} ms`);
  expect(failed.code).toBe(grpc.status.DEADLINE_EXCEEDED);
  expect(failed.ms).toBeGreaterThanOrEqual(SHORT_MS - 100);
  expect(failed.ms).toBeLessThan(DUE_AT_DEADLINE_MS);
  // The client's own deadline answers it; the server gave up on CH at that deadline too (a hung CH never answers).
  expect(answered.outcome).toBe("HYPERVISOR_UNAVAILABLE");
  expect(answered.ms).toBeLessThan(DUE_AT_DEADLINE_MS);
  // The server records CANCELLED when the client's RST_STREAM at its deadline arrives before the
  // server's own deadline timer (src/grpc/adapter.ts callSignal cannot tell them apart): either is seen.
  expect([grpc.status.DEADLINE_EXCEEDED, grpc.status.CANCELLED]).toContain(answered.code);
  expect(ch.requests.map((r) => r.endpoint)).toEqual(["vm.info"]);

  // A hung CH serves nobody until it is restarted (ChDouble cannot lift a hang): a fresh CH holds nothing.
  await ch.close();
  const restarted = await startCh(socket, sysfs);
  expect(await expectListMatchesCh(server.client, "f3", socket)).toEqual([]);
  expect(addDevices(restarted)).toEqual([]);
});

test("4. CH 500 on add-device: INTERNAL (HYPERVISOR_ERROR) with CH's text; CH added nothing", async () => {
  const { socket, sysfs, server } = await chSetup("f4");
  const ch = await startCh(socket, sysfs);
  const chain = [
    "Error from API",
    "The device could not be added to the VM",
    "Error from device manager",
    "Cannot create a VFIO device",
    "failed to open /dev/vfio/vfio container: No such file or directory (os error 2)",
  ];
  ch.inject("vm.add-device", { kind: "respond", status: 500, body: JSON.stringify(chain) });

  const failed = await timedFailure(() => server.client.attach({ vm: "f4", pci: GPU, id: "gpu0" }, { timeoutMs: FAST_MS }));
  record("4. CH 500 on add-device", failed);
  expect(failed).toMatchObject({ code: grpc.status.INTERNAL, reason: "HYPERVISOR_ERROR" });
  expect(failed.message).toContain(chain.join(": "));
  expect(failed.ms).toBeLessThan(FAST_MS);

  expect(await expectListMatchesCh(server.client, "f4", socket)).toEqual([]);
  expect(addDevices(ch)).toHaveLength(1);
});

test("5. CH 200 with garbage JSON on vm.info: INTERNAL (HYPERVISOR_ERROR), no add-device", async () => {
  const { socket, sysfs, server } = await chSetup("f5");
  const ch = await startCh(socket, sysfs);
  ch.inject("vm.info", { kind: "respond", status: 200, body: '{"config":{"devices":[{"id":"gpu' });

  const failed = await timedFailure(() => server.client.attach({ vm: "f5", pci: GPU, id: "gpu0" }, { timeoutMs: FAST_MS }));
  record("5. CH garbage JSON (vm.info)", failed);
  expect(failed).toMatchObject({ code: grpc.status.INTERNAL, reason: "HYPERVISOR_ERROR" });
  expect(failed.message).toContain("unparseable reply");
  expect(failed.ms).toBeLessThan(FAST_MS);

  expect(await expectListMatchesCh(server.client, "f5", socket)).toEqual([]);
  expect(addDevices(ch)).toEqual([]);
});

test("6. CH drops the connection after adding (lost ACK): UNAVAILABLE, List shows the device, add-device sent once", async () => {
  const { socket, sysfs, server } = await chSetup("f6");
  const ch = await startCh(socket, sysfs);
  ch.inject("vm.add-device", { kind: "close-mid-response" });

  const failed = await timedFailure(() => server.client.attach({ vm: "f6", pci: GPU, id: "gpu0" }, { timeoutMs: FAST_MS }));
  record("6. CH closes mid-response (add-device)", failed);
  expect(failed).toMatchObject({ code: grpc.status.UNAVAILABLE, reason: "HYPERVISOR_UNAVAILABLE" });
  expect(failed.message).toContain("vm.add-device");
  expect(failed.message).toContain("the device may have been added: List to check");
  expect(failed.ms).toBeLessThan(FAST_MS);

  // CH did add it; vfiod must say so, not pretend otherwise.
  expect(await expectListMatchesCh(server.client, "f6", socket)).toEqual([
    { id: "gpu0", bdf: GPU, guestBdf: expect.stringMatching(/^0000:00:/) },
  ]);
  // The caller's retry is the idempotent OK, and add-device was never repeated.
  const { device } = await server.client.attach({ vm: "f6", pci: GPU, id: "gpu0" }, { timeoutMs: FAST_MS });
  expect(device).toMatchObject({ id: "gpu0", bdf: GPU });
  expect(addDevices(ch).map((r) => r.body)).toEqual([{ id: "gpu0", path: sysfsPath(GPU) }]);
});

test("7. CH add-device slower than the deadline: DEADLINE_EXCEEDED at ~1 s; CH finishes the add; List shows it", async () => {
  const { log, lines } = capturedLogger();
  const { socket, sysfs, server } = await chSetup("f7", log);
  const ch = await startCh(socket, sysfs);
  const delayMs = 3_000;
  ch.inject("vm.add-device", { kind: "delay", ms: delayMs });

  const failed = await timedFailure(() => server.client.attach({ vm: "f7", pci: GPU, id: "gpu0" }, { timeoutMs: SHORT_MS }));
  // The caller is answered at its deadline, before CH finishes the add: nothing logged the attach yet.
  const attachedBeforeAnswer = lines.some((line) => line.msg === "device attached");
  expect(failed.code).toBe(grpc.status.DEADLINE_EXCEEDED);
  expect(attachedBeforeAnswer).toBe(false);
  expect(failed.ms).toBeGreaterThanOrEqual(SHORT_MS - 100);
  expect(failed.ms).toBeLessThan(DUE_AT_DEADLINE_MS);
  expect(addDevices(ch)).toHaveLength(1);

  // By design (src/backends/sent-request.ts) vfiod reads a sent add-device to its outcome, holding
  // the VM's lock, and logs what the caller never saw.
  const answered = await serverAnswer("f7");
  record("7. CH slow add-device (3 s)", failed, `${answered.outcome} after ${answered.ms} ms (add read to its end)`);
  expect(answered.outcome).toBe("OK");
  expect(answered.ms).toBeGreaterThanOrEqual(delayMs - 100);
  expect(lines).toContainEqual(
    expect.objectContaining({ msg: "Attach done", vm: "f7", id: "gpu0", device: GPU, callerGaveUp: true }),
  );

  expect(await expectListMatchesCh(server.client, "f7", socket)).toEqual([
    { id: "gpu0", bdf: GPU, guestBdf: expect.stringMatching(/^0000:00:/) },
  ]);
  expect(addDevices(ch)).toHaveLength(1);
});

// ---- QEMU monitor double ----

test("8. QMP monitor closes after running device_add (lost reply): UNAVAILABLE saying the device may have been added; List shows it", async () => {
  const dir = tempDir();
  const sysfs = fakeSysfs();
  const qmp = await QmpDouble.start({
    rootPorts: 2,
    hostDevices: [GPU, AUDIO],
    devices: [{ id: "hostdev0", driver: "vfio-pci", bus: "rp1", sysfsdev: sysfsPath(GPU) }],
    hangUpAfter: "device_add",
  });
  cleanups.push(() => qmp.close());
  const inventoryFile = writeInventory(dir, { name: "f8", hypervisor: "qemu", socket: qmp.socket });
  const server = await startTestServer({ inventoryFile, sysfsRoot: sysfs.root });
  cleanups.push(() => server.stop());

  const failed = await timedFailure(() => server.client.attach({ vm: "f8", pci: AUDIO, id: "gpu1" }, { timeoutMs: FAST_MS }));
  record("8. QMP closes after running device_add", failed);
  expect(failed).toMatchObject({ code: grpc.status.UNAVAILABLE, reason: "HYPERVISOR_UNAVAILABLE" });
  expect(failed.message).toContain("device_add");
  expect(failed.message).toContain("the device may have been added: List to check");
  expect(failed.ms).toBeLessThan(FAST_MS);
  expect(qmp.answersTo("device_add")).toEqual(["hung up"]);

  // QEMU did add it; vfiod must say so, not pretend otherwise.
  const held = await qmpHolds(qmp.socket);
  expect(held).toEqual([
    { id: "gpu1", bdf: AUDIO },
    { id: "hostdev0", bdf: GPU },
  ]);
  expect(await listed(server.client, "f8", false)).toEqual(held);
  // The caller's retry is the idempotent OK, and device_add was never repeated.
  const { device } = await server.client.attach({ vm: "f8", pci: AUDIO, id: "gpu1" }, { timeoutMs: FAST_MS });
  expect(device).toMatchObject({ id: "gpu1", bdf: AUDIO });
  expect(qmp.commands("device_add")).toHaveLength(1);
});

// ---- the vfiod process ----

test("9. vfiod SIGKILLed mid-Attach: a new vfiod rebinds the socket, List shows what CH added, the retry is an idempotent OK", async () => {
  const dir = tempDir();
  const sysfs = fakeSysfs();
  const chSocket = path.join(dir, "ch.sock");
  const ch = await startCh(chSocket, sysfs);
  ch.inject("vm.add-device", { kind: "delay", ms: 1_500 });
  const inventory = writeInventory(dir, { name: "f9", hypervisor: "cloud-hypervisor", socket: chSocket });
  const grpcSocket = path.join(dir, "vfiod.sock");
  const args = ["--inventory", inventory, "--sysfs-root", sysfs.root, "--cocoon-root", dir, "--socket", grpcSocket];
  const processes: VfiodProcess[] = [];
  const clients: DeviceClient[] = [];
  cleanups.push(async () => {
    clients.forEach((c) => c.close());
    for (const p of processes) if (p.child.exitCode === null && p.child.signalCode === null) p.child.kill("SIGKILL");
    await Promise.all(processes.map((p) => p.exited));
  });
  const serve = async (): Promise<DeviceClient> => {
    processes.push(await startVfiod(args));
    const client = createDeviceClient(`unix:${grpcSocket}`);
    clients.push(client);
    return client;
  };

  const first = await serve();
  const attaching = timedFailure(() => first.attach({ vm: "f9", pci: GPU, id: "gpu0" }, { timeoutMs: 10_000 }));
  await waitFor(() => addDevices(ch).length === 1, "CH receives add-device");
  const killedAt = performance.now();
  processes[0]!.child.kill("SIGKILL");
  expect(await processes[0]!.exited).toBe("SIGKILL");
  const failed = await attaching;
  const afterKill = { ...failed, ms: Math.round(performance.now() - killedAt) };
  record("9. vfiod SIGKILLed mid-Attach (answer after the kill)", afterKill);
  expect(failed.code).toBe(grpc.status.UNAVAILABLE);
  expect(afterKill.ms).toBeLessThan(FAST_MS);
  expect(fs.statSync(grpcSocket).isSocket()).toBe(true); // left behind by the kill

  const second = await serve();
  expect(await checkHealth(`unix:${grpcSocket}`, "vfiod.v1.DeviceService")).toBe("SERVING");
  // CH completed the add the dead process asked for.
  expect(await expectListMatchesCh(second, "f9", chSocket)).toEqual([
    { id: "gpu0", bdf: GPU, guestBdf: expect.stringMatching(/^0000:00:/) },
  ]);
  const retried = await second.attach({ vm: "f9", pci: GPU, id: "gpu0" }, { timeoutMs: FAST_MS });
  expect(retried.device).toMatchObject({ id: "gpu0", bdf: GPU, path: sysfsPath(GPU) });
  expect(addDevices(ch)).toHaveLength(1);

  // Nothing else left behind: no lock or state files, and a clean stop removes the socket.
  expect(fs.readdirSync(dir).sort()).toEqual(["ch.sock", "inventory.json", "vfiod.sock"]);
  expect(await processes[1]!.stop()).toBe(0);
  expect(fs.existsSync(grpcSocket)).toBe(false);
});

// ---- real QEMU ----

const testQemu = qemuAvailable() ? test : test.skip;

testQemu("10. real QEMU killed while vfiod serves it: List is UNAVAILABLE (socket left, refused) at once", async () => {
  const dir = tempDir();
  const sysfs = fakeSysfs();
  const vm = await startQemu({ rootPorts: 2 });
  cleanups.push(() => vm.stop());
  const inventoryFile = writeInventory(dir, { name: "f10", hypervisor: "qemu", socket: vm.socket });
  const server = await startTestServer({ inventoryFile, sysfsRoot: sysfs.root });
  cleanups.push(() => server.stop());

  const held = await qmpHolds(vm.socket);
  expect(held).toEqual([]);
  expect(await listed(server.client, "f10", false)).toEqual(held);

  await vm.kill();
  expect(fs.statSync(vm.socket).isSocket()).toBe(true);
  const failed = await timedFailure(() => server.client.list({ vm: "f10" }, { timeoutMs: FAST_MS }));
  record("10. real QEMU killed (List)", failed);
  expect(failed).toMatchObject({ code: grpc.status.UNAVAILABLE, reason: "HYPERVISOR_UNAVAILABLE" });
  expect(failed.message).toContain("refused");
  expect(failed.ms).toBeLessThan(FAST_MS);
  // Attach too: refused before any device_add could be sent.
  const attach = await timedFailure(() => server.client.attach({ vm: "f10", pci: GPU, id: "gpu0" }, { timeoutMs: FAST_MS }));
  expect(attach).toMatchObject({ code: grpc.status.UNAVAILABLE, reason: "HYPERVISOR_UNAVAILABLE" });
});
