// DeviceService over real gRPC, against Cloud Hypervisor doubles on real Unix
// sockets, a fake sysfs tree and a static inventory: the contract's paths and
// every refusal, with what (if anything) reached the hypervisor.
import * as grpc from "@grpc/grpc-js";
import { create, toBinary } from "@bufbuild/protobuf";
import { flockSync } from "fs-ext";
import { randomUUID } from "node:crypto";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { AttachRequestSchema, ListRequestSchema } from "../../gen/vfiod/v1/device_pb";
import { AuditLog } from "../../src/audit";
import { errorReason } from "../../src/grpc/client";
import { DeviceAllowList } from "../../src/host/device-allow-list";
import { ChDouble, type ChVmState } from "../support/ch-double";
import { buildFakeSysfs, type FakeSysfs } from "../support/fake-sysfs";
import { rawVmInfo } from "../support/load";
import { failure, startTestServer, type TestServer, type TestServerOptions } from "../support/test-server";
import { capturingLogger, readAuditLog, type LogLine } from "../support/log-capture";
import { waitFor } from "../support/wait";

let dir: string;
let sysfs: FakeSysfs;
let server: TestServer;
const doubles = new Map<string, ChDouble>();

async function chVm(name: string, state: ChVmState): Promise<{ name: string; hypervisor: string; socket: string }> {
  const socket = path.join(dir, `${name}.sock`);
  const double = await ChDouble.start(socket);
  double.setState(state);
  doubles.set(name, double);
  return { name, hypervisor: "cloud-hypervisor", socket };
}

const ch = (name: string) => doubles.get(name)!;
const addDeviceRequests = (name: string) => ch(name).requests.filter((r) => r.endpoint === "vm.add-device");

beforeEach(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "vfiod-svc-"));
  sysfs = buildFakeSysfs([
    { bdf: "0000:01:00.0", driver: "vfio-pci", group: 12 },
    { bdf: "0000:01:00.1", driver: "vfio-pci", group: 12 },
    { bdf: "0000:02:00.0", driver: "nvidia", group: 13 },
    { bdf: "0000:04:00.0", driver: "vfio-pci", group: 15 },
    { bdf: "0000:04:00.1", driver: "snd_hda_intel", group: 15 },
  ]);
  const vms = [
    await chVm("gpu-vm", "Running"),
    await chVm("paused-vm", "Paused"),
    await chVm("created-vm", "Created"),
    { name: "fc-vm", hypervisor: "firecracker", socket: path.join(dir, "fc.sock") },
    { name: "bhyve-vm", hypervisor: "bhyve", socket: path.join(dir, "bhyve.sock") },
  ];
  const inventoryFile = path.join(dir, "inventory.json");
  fs.writeFileSync(inventoryFile, JSON.stringify({ vms }));
  server = await startTestServer({ inventoryFile, sysfsRoot: sysfs.root });
});

/** Servers a test starts beside the shared one (own options, own backends); stopped after it. */
const extraServers: TestServer[] = [];

/** Another vfiod on the same inventory file and sysfs tree, with `options`. */
async function serverWith(options: Partial<TestServerOptions>): Promise<TestServer> {
  const started = await startTestServer({ inventoryFile: path.join(dir, "inventory.json"), sysfsRoot: sysfs.root, ...options });
  extraServers.push(started);
  return started;
}

afterEach(async () => {
  for (const extra of extraServers.splice(0)) await extra.stop();
  await server.stop();
  for (const double of doubles.values()) await double.close();
  doubles.clear();
  sysfs.cleanup();
  fs.rmSync(dir, { recursive: true, force: true });
});

describe("attach, list, detach", () => {
  test.each(["01:00.0", "0000:01:00.0", "/sys/bus/pci/devices/0000:01:00.0", " /sys/bus/pci/devices/0000:01:00.0/ "])(
    "Attach %j reaches the hypervisor as the canonical path; List shows it; Detach removes it",
    async (pci) => {
      const { client } = server;
      const { device } = await client.attach({ vm: "gpu-vm", pci, id: "gpu0" });
      expect(device).toMatchObject({ id: "gpu0", bdf: "0000:01:00.0", path: "/sys/bus/pci/devices/0000:01:00.0" });
      expect(device?.guestBdf).toMatch(/^0000:00:[0-1][0-9a-f]\.0$/);
      expect(addDeviceRequests("gpu-vm").map((r) => r.body)).toEqual([
        { id: "gpu0", path: "/sys/bus/pci/devices/0000:01:00.0" },
      ]);

      const listed = await client.list({ vm: "gpu-vm" });
      expect(listed.devices.map((d) => ({ id: d.id, bdf: d.bdf, guestBdf: d.guestBdf }))).toEqual([
        { id: "gpu0", bdf: "0000:01:00.0", guestBdf: device?.guestBdf },
      ]);

      const detaching = client.detach({ vm: "gpu-vm", id: "gpu0" });
      await waitFor(() => ch("gpu-vm").pendingRemovals().includes("gpu0"), "the removal is requested");
      ch("gpu-vm").guestEjects("gpu0");
      await detaching;
      expect((await client.list({ vm: "gpu-vm" })).devices).toEqual([]);
    },
  );

  test("Attach without an id returns the id Cloud Hypervisor chose", async () => {
    const { device } = await server.client.attach({ vm: "gpu-vm", pci: "01:00.1", id: "" });
    expect(device?.id).toMatch(/^_vfio\d+$/);
    expect(addDeviceRequests("gpu-vm").map((r) => r.body)).toEqual([{ path: "/sys/bus/pci/devices/0000:01:00.1" }]);
  });

  test("the same id and device again is an idempotent OK that sends nothing", async () => {
    const first = await server.client.attach({ vm: "gpu-vm", pci: "01:00.0", id: "gpu0" });
    const again = await server.client.attach({ vm: "gpu-vm", pci: "/sys/bus/pci/devices/0000:01:00.0", id: "gpu0" });
    expect(again.device).toEqual(first.device);
    expect(addDeviceRequests("gpu-vm")).toHaveLength(1);
  });

  test("List of a VM is found by its name; Firecracker lists nothing", async () => {
    expect((await server.client.list({ vm: "gpu-vm" })).devices).toEqual([]);
    expect((await server.client.list({ vm: "fc-vm" })).devices).toEqual([]);
  });

  test("Detach that the guest never acknowledges answers DETACH_PENDING, and List tells the truth", async () => {
    await server.client.attach({ vm: "gpu-vm", pci: "01:00.0", id: "gpu0" });
    const started = Date.now();
    const err = await failure(server.client.detach({ vm: "gpu-vm", id: "gpu0" }));
    expect(err).toMatchObject({ code: grpc.status.DEADLINE_EXCEEDED, reason: "DETACH_PENDING" });
    expect(Date.now() - started).toBeLessThan(5000);
    expect(ch("gpu-vm").pendingRemovals()).toEqual(["gpu0"]);
    const removes = () => ch("gpu-vm").requests.filter((r) => r.endpoint === "vm.remove-device").length;
    expect(removes()).toBe(1);
    // A retry waits again without sending a second removal, and completes once the guest lets go.
    const retry = server.client.detach({ vm: "gpu-vm", id: "gpu0" });
    setTimeout(() => ch("gpu-vm").guestEjects("gpu0"), 200);
    await retry;
    expect(removes()).toBe(1);
  });
});

describe("refusals (contract.md status table)", () => {
  const noRequestsTo = (name: string) => expect(ch(name).requests).toEqual([]);

  test.each([
    ["empty pci", { pci: "" }],
    ["garbage pci", { pci: "not-a-device" }],
    ["arbitrary host path", { pci: "/etc/passwd" }],
    ["path escaping sysfs", { pci: "/sys/bus/pci/devices/../../../../dev/sda" }],
    ["device number above 1f", { pci: "01:20.0" }],
    ["bad id", { id: "has space" }],
    ["reserved id", { id: "cocoon-gpu" }],
    ["empty vm", { vm: "" }],
  ])("%s is INVALID_ARGUMENT and the hypervisor hears nothing", async (_name, change) => {
    const request = { vm: "gpu-vm", pci: "01:00.0", id: "gpu0", ...change };
    expect(await failure(server.client.attach(request))).toMatchObject({
      code: grpc.status.INVALID_ARGUMENT,
      reason: "INVALID_ARGUMENT",
    });
    noRequestsTo("gpu-vm");
  });

  test("Detach without an id is INVALID_ARGUMENT", async () => {
    expect(await failure(server.client.detach({ vm: "gpu-vm", id: "" }))).toMatchObject({
      code: grpc.status.INVALID_ARGUMENT,
      reason: "INVALID_ARGUMENT",
    });
    noRequestsTo("gpu-vm");
  });

  test("an unknown VM is NOT_FOUND (VM_NOT_FOUND)", async () => {
    expect(await failure(server.client.attach({ vm: "nope", pci: "01:00.0", id: "" }))).toMatchObject({
      code: grpc.status.NOT_FOUND,
      reason: "VM_NOT_FOUND",
    });
    expect(await failure(server.client.list({ vm: "nope" }))).toMatchObject({ reason: "VM_NOT_FOUND" });
  });

  test("a VM that is created but not booted is VM_NOT_RUNNING, with no add-device", async () => {
    expect(await failure(server.client.attach({ vm: "created-vm", pci: "01:00.0", id: "" }))).toMatchObject({
      code: grpc.status.FAILED_PRECONDITION,
      reason: "VM_NOT_RUNNING",
    });
    expect(addDeviceRequests("created-vm")).toEqual([]);
  });

  test("a paused VM is VM_PAUSED, with no add-device", async () => {
    expect(await failure(server.client.attach({ vm: "paused-vm", pci: "01:00.0", id: "" }))).toMatchObject({
      code: grpc.status.FAILED_PRECONDITION,
      reason: "VM_PAUSED",
    });
    expect(addDeviceRequests("paused-vm")).toEqual([]);
  });

  test("a Firecracker VM is UNIMPLEMENTED: backend does not support device attach", async () => {
    const attach = await failure(server.client.attach({ vm: "fc-vm", pci: "01:00.0", id: "" }));
    expect(attach).toMatchObject({ code: grpc.status.UNIMPLEMENTED, reason: "BACKEND_UNSUPPORTED" });
    expect(attach.message).toContain("backend does not support device attach");
    const detach = await failure(server.client.detach({ vm: "fc-vm", id: "x" }));
    expect(detach).toMatchObject({ code: grpc.status.UNIMPLEMENTED, reason: "BACKEND_UNSUPPORTED" });
  });

  test("an inventory entry naming a hypervisor type vfiod has no backend for is refused when the file is read", async () => {
    // The same file, served by a vfiod whose log the test reads.
    const { log, lines } = capturingLogger();
    const logged = await startTestServer({ inventoryFile: path.join(dir, "inventory.json"), sysfsRoot: sysfs.root, log });
    try {
      const err = await failure(logged.client.attach({ vm: "bhyve-vm", pci: "01:00.0", id: "" }));
      expect(err).toMatchObject({ code: grpc.status.NOT_FOUND, reason: "VM_NOT_FOUND" });
      // The file's other VMs are served.
      expect((await logged.client.list({ vm: "gpu-vm" })).devices).toEqual([]);
      await logged.client.list({ vm: "gpu-vm" });
      const refused = lines.filter((l) => l.msg.startsWith("inventory entry refused"));
      expect(refused).toEqual([
        expect.objectContaining({ path: path.join(dir, "inventory.json"), why: expect.stringContaining('"bhyve-vm": unknown hypervisor "bhyve"') }),
      ]);
    } finally {
      await logged.stop();
    }
  });


  test("a missing host device is NOT_FOUND (DEVICE_NOT_FOUND), hypervisor untouched", async () => {
    expect(await failure(server.client.attach({ vm: "gpu-vm", pci: "09:00.0", id: "" }))).toMatchObject({
      code: grpc.status.NOT_FOUND,
      reason: "DEVICE_NOT_FOUND",
    });
    noRequestsTo("gpu-vm");
  });

  test("a device on another driver is DEVICE_NOT_VFIO naming the driver, hypervisor untouched", async () => {
    const err = await failure(server.client.attach({ vm: "gpu-vm", pci: "02:00.0", id: "" }));
    expect(err).toMatchObject({ code: grpc.status.FAILED_PRECONDITION, reason: "DEVICE_NOT_VFIO" });
    expect(err.message).toContain("nvidia");
    noRequestsTo("gpu-vm");
  });

  test("a group with a host-driver companion is IOMMU_GROUP_NOT_VIABLE naming it, hypervisor untouched", async () => {
    const err = await failure(server.client.attach({ vm: "gpu-vm", pci: "04:00.0", id: "" }));
    expect(err).toMatchObject({ code: grpc.status.FAILED_PRECONDITION, reason: "IOMMU_GROUP_NOT_VIABLE" });
    expect(err.message).toContain("0000:04:00.1 (driver snd_hda_intel)");
    noRequestsTo("gpu-vm");
  });

  test("an id used by another device is ALREADY_EXISTS (ID_IN_USE); no second add-device", async () => {
    await server.client.attach({ vm: "gpu-vm", pci: "01:00.0", id: "gpu0" });
    expect(await failure(server.client.attach({ vm: "gpu-vm", pci: "01:00.1", id: "gpu0" }))).toMatchObject({
      code: grpc.status.ALREADY_EXISTS,
      reason: "ID_IN_USE",
    });
    expect(addDeviceRequests("gpu-vm")).toHaveLength(1);
  });

  test("a device attached under another id is ALREADY_EXISTS (DEVICE_ALREADY_ATTACHED)", async () => {
    await server.client.attach({ vm: "gpu-vm", pci: "01:00.0", id: "gpu0" });
    const err = await failure(server.client.attach({ vm: "gpu-vm", pci: "01:00.0", id: "gpu1" }));
    expect(err).toMatchObject({ code: grpc.status.ALREADY_EXISTS, reason: "DEVICE_ALREADY_ATTACHED" });
    expect(err.message).toContain("gpu0");
    expect(addDeviceRequests("gpu-vm")).toHaveLength(1);
  });

  test("Detach of an id that is not attached is NOT_FOUND (DEVICE_NOT_ATTACHED), nothing removed", async () => {
    expect(await failure(server.client.detach({ vm: "gpu-vm", id: "ghost" }))).toMatchObject({
      code: grpc.status.NOT_FOUND,
      reason: "DEVICE_NOT_ATTACHED",
    });
    expect(ch("gpu-vm").requests.filter((r) => r.endpoint === "vm.remove-device")).toEqual([]);
  });

  test("a hypervisor whose socket is gone is UNAVAILABLE (HYPERVISOR_UNAVAILABLE)", async () => {
    await ch("gpu-vm").close();
    fs.rmSync(path.join(dir, "gpu-vm.sock"), { force: true });
    expect(await failure(server.client.list({ vm: "gpu-vm" }))).toMatchObject({
      code: grpc.status.UNAVAILABLE,
      reason: "HYPERVISOR_UNAVAILABLE",
    });
  });

  test("a Cloud Hypervisor 500 is INTERNAL (HYPERVISOR_ERROR) with its text", async () => {
    ch("gpu-vm").inject("vm.add-device", {
      kind: "respond",
      status: 500,
      body: '["Error from API","The device could not be added to the VM","Error from device manager","Cannot create a VFIO device","group is not viable"]',
    });
    const err = await failure(server.client.attach({ vm: "gpu-vm", pci: "01:00.0", id: "gpu0" }));
    expect(err).toMatchObject({ code: grpc.status.INTERNAL, reason: "HYPERVISOR_ERROR" });
    expect(err.message).toContain("Cannot create a VFIO device");
    expect(addDeviceRequests("gpu-vm")).toHaveLength(1);
  });
});

test("a caller's deadline reaches the hypervisor call: a hung Cloud Hypervisor gives DEADLINE_EXCEEDED in time", async () => {
  ch("gpu-vm").inject("vm.info", { kind: "hang" });
  const started = Date.now();
  const err = await failure(server.client.list({ vm: "gpu-vm" }, { timeoutMs: 300 }));
  expect(err.code).toBe(grpc.status.DEADLINE_EXCEEDED);
  expect(Date.now() - started).toBeLessThan(2000);
});

describe("static inventory names are not prefixes (issue 8 item 6)", () => {
  test("an entry named gpu-node-1 without an id is not found as \"gpu\", and its hypervisor hears nothing", async () => {
    const node = await chVm("gpu-node-1", "Running");
    const inventoryFile = path.join(dir, "names.json");
    fs.writeFileSync(inventoryFile, JSON.stringify({ vms: [node] }));
    const named = await serverWith({ inventoryFile });
    expect(await failure(named.client.list({ vm: "gpu" }))).toMatchObject({ code: grpc.status.NOT_FOUND, reason: "VM_NOT_FOUND" });
    expect(await failure(named.client.attach({ vm: "gpu", pci: "01:00.0", id: "gpu0" }))).toMatchObject({
      code: grpc.status.NOT_FOUND,
      reason: "VM_NOT_FOUND",
    });
    expect(await failure(named.client.detach({ vm: "gpu-node", id: "gpu0" }))).toMatchObject({ reason: "VM_NOT_FOUND" });
    expect(ch("gpu-node-1").requests).toEqual([]);
    // Its whole name still finds it.
    expect((await named.client.list({ vm: "gpu-node-1" })).devices).toEqual([]);
  });
});

describe("a retried Detach after the removal completed is OK (issue 8 item 7, Cloud Hypervisor)", () => {
  const removes = () => ch("gpu-vm").requests.filter((r) => r.endpoint === "vm.remove-device");

  async function pendingRemoval(): Promise<TestServer> {
    const quick = await serverWith({ detachTimeoutMs: 300 });
    await quick.client.attach({ vm: "gpu-vm", pci: "01:00.0", id: "gpu0" });
    expect(await failure(quick.client.detach({ vm: "gpu-vm", id: "gpu0" }))).toMatchObject({
      code: grpc.status.DEADLINE_EXCEEDED,
      reason: "DETACH_PENDING",
    });
    ch("gpu-vm").guestEjects("gpu0");
    return quick;
  }

  test("DETACH_PENDING, the guest ejects, Detach again answers OK (and again), with one remove-device", async () => {
    const quick = await pendingRemoval();
    await expect(quick.client.detach({ vm: "gpu-vm", id: "gpu0" })).resolves.toEqual({ $typeName: "vfiod.v1.DetachResponse" });
    await expect(quick.client.detach({ vm: "gpu-vm", id: "gpu0" })).resolves.toBeDefined();
    expect(removes()).toHaveLength(1);
    expect((await quick.client.list({ vm: "gpu-vm" })).devices).toEqual([]);
  });

  test("with a List between the eject and the retry, the retry is still OK", async () => {
    const quick = await pendingRemoval();
    expect((await quick.client.list({ vm: "gpu-vm" })).devices).toEqual([]);
    await expect(quick.client.detach({ vm: "gpu-vm", id: "gpu0" })).resolves.toBeDefined();
    expect(removes()).toHaveLength(1);
  });

  test("an id vfiod never removed is still DEVICE_NOT_ATTACHED", async () => {
    const quick = await pendingRemoval();
    expect(await failure(quick.client.detach({ vm: "gpu-vm", id: "gpu1" }))).toMatchObject({
      code: grpc.status.NOT_FOUND,
      reason: "DEVICE_NOT_ATTACHED",
    });
    // Nor does another vfiod, which never requested gpu0's removal, take it for one of its own.
    expect(await failure(server.client.detach({ vm: "gpu-vm", id: "gpu0" }))).toMatchObject({ reason: "DEVICE_NOT_ATTACHED" });
  });
});

test("Cloud Hypervisor's 204 to add-device (the VM left Running after vfiod's read) is VM_NOT_RUNNING, and the device is taken out of its config (issue 8 item 8)", async () => {
  ch("gpu-vm").inject("vm.add-device", { kind: "state-first", state: "Created" });
  const err = await failure(server.client.attach({ vm: "gpu-vm", pci: "01:00.0", id: "gpu0" }));
  expect(err).toMatchObject({ code: grpc.status.FAILED_PRECONDITION, reason: "VM_NOT_RUNNING" });
  expect(err.message).toContain("taken out again");
  const info = await rawVmInfo(path.join(dir, "gpu-vm.sock"));
  expect(info.state).toBe("Created");
  expect(info.config.devices ?? []).toEqual([]);
  expect(ch("gpu-vm").requests.filter((r) => r.method === "PUT").map((r) => [r.endpoint, r.body])).toEqual([
    ["vm.add-device", { id: "gpu0", path: "/sys/bus/pci/devices/0000:01:00.0" }],
    ["vm.remove-device", { id: "gpu0" }],
  ]);
});

test.each(["_disk0", "_virtio-pci-_disk0"])(
  "Detach of %j, a node of a virtio disk, is DEVICE_NOT_ATTACHED at once and removes nothing (issue 8 item 9)",
  async (id) => {
    expect(ch("gpu-vm").addDisk()).toBe("_disk0");
    const patient = await serverWith({ detachTimeoutMs: 5000 });
    const started = Date.now();
    const err = await failure(patient.client.detach({ vm: "gpu-vm", id }));
    expect(Date.now() - started).toBeLessThan(1000);
    expect(err).toMatchObject({ code: grpc.status.NOT_FOUND, reason: "DEVICE_NOT_ATTACHED" });
    expect(ch("gpu-vm").requests.filter((r) => r.endpoint === "vm.remove-device")).toEqual([]);
    expect(Object.keys((await rawVmInfo(path.join(dir, "gpu-vm.sock"))).device_tree ?? {})).toEqual(
      expect.arrayContaining(["_disk0", "_virtio-pci-_disk0"]),
    );
  },
);

describe("Firecracker is refused before the host or locks are looked at (issue 8 item 14)", () => {
  const unsupported = { code: grpc.status.UNIMPLEMENTED, reason: "BACKEND_UNSUPPORTED" };

  test.each([
    ["a device that does not exist (else DEVICE_NOT_FOUND)", "09:00.0"],
    ["a device on a host driver (else DEVICE_NOT_VFIO)", "02:00.0"],
    ["a device whose group is not viable (else IOMMU_GROUP_NOT_VIABLE)", "04:00.0"],
  ])("Attach of %s is BACKEND_UNSUPPORTED", async (_what, pci) => {
    const err = await failure(server.client.attach({ vm: "fc-vm", pci, id: "" }));
    expect(err).toMatchObject(unsupported);
    expect(err.message).toContain("backend does not support device attach");
  });

  test("Attach of a device another VM holds (else DEVICE_IN_USE) is BACKEND_UNSUPPORTED", async () => {
    await server.client.attach({ vm: "gpu-vm", pci: "01:00.0", id: "gpu0" });
    const err = await failure(server.client.attach({ vm: "fc-vm", pci: "01:00.0", id: "" }));
    expect(err).toMatchObject(unsupported);
    expect(err.message).toContain("backend does not support device attach");
  });

  test("the allow-list still comes first: a device outside it is DEVICE_NOT_ALLOWED, even for Firecracker", async () => {
    const listed = await serverWith({ allowList: DeviceAllowList.parse("0000:01:00.0", sysfs.root) });
    expect(await failure(listed.client.attach({ vm: "fc-vm", pci: "02:00.0", id: "" }))).toMatchObject({
      code: grpc.status.PERMISSION_DENIED,
      reason: "DEVICE_NOT_ALLOWED",
    });
    expect(await failure(listed.client.attach({ vm: "fc-vm", pci: "01:00.0", id: "" }))).toMatchObject(unsupported);
  });

  test("a cocoon Firecracker VM whose ops.lock is held, or that is not running, answers BACKEND_UNSUPPORTED at once", async () => {
    // A cocoon root with a running Firecracker VM (record, pid file, fake /proc) and a stopped one.
    const root = path.join(dir, "cocoon");
    const runDir = path.join(root, "run", "firecracker", "FCVM0000000000000000000001");
    fs.mkdirSync(path.join(root, "firecracker", "db"), { recursive: true });
    fs.mkdirSync(runDir, { recursive: true });
    const pid = 4343;
    const socket = path.join(runDir, "api.sock");
    const vms = {
      FCVM0000000000000000000001: { id: "FCVM0000000000000000000001", state: "running", config: { name: "fc-locked" }, pid, run_dir: runDir },
      FCVM0000000000000000000002: { id: "FCVM0000000000000000000002", state: "stopped", config: { name: "fc-stopped" } },
    };
    fs.writeFileSync(path.join(root, "firecracker", "db", "vms.json"), JSON.stringify({ vms, names: {} }));
    fs.writeFileSync(path.join(runDir, "fc.pid"), `${pid}\n`);
    const procRoot = path.join(dir, "proc");
    fs.mkdirSync(path.join(procRoot, String(pid)), { recursive: true });
    fs.symlinkSync("/usr/bin/firecracker", path.join(procRoot, String(pid), "exe"));
    fs.writeFileSync(path.join(procRoot, String(pid), "cmdline"), `firecracker\0--api-sock\0${socket}\0`);
    const cocoon = await serverWith({ cocoonRoot: root, procRoot });
    expect((await cocoon.client.list({ vm: "fc-locked" })).devices).toEqual([]); // resolves, and is running

    const lock = fs.openSync(path.join(runDir, "ops.lock"), "a");
    try {
      flockSync(lock, "exnb"); // held as another cocoon operation would hold it
      for (const call of [
        () => cocoon.client.attach({ vm: "fc-locked", pci: "01:00.0", id: "" }, { timeoutMs: 5000 }),
        () => cocoon.client.detach({ vm: "fc-locked", id: "gpu0" }, { timeoutMs: 5000 }),
        () => cocoon.client.attach({ vm: "fc-stopped", pci: "09:00.0", id: "" }, { timeoutMs: 5000 }),
      ]) {
        const started = Date.now();
        const err = await failure(call());
        expect(Date.now() - started).toBeLessThan(1000);
        expect(err).toMatchObject(unsupported);
        expect(err.message).toContain("backend does not support device attach");
      }
    } finally {
      fs.closeSync(lock);
    }
  });
});

describe("the audit line says what changed (issue 8 item 15)", () => {
  const VM_ID = "a1b2c3d4e5f60718";

  test("resolved VM id and name (not the prefix typed), the canonical BDF attached, and the BDF a Detach removed", async () => {
    const inventoryFile = path.join(dir, "ids.json");
    fs.writeFileSync(
      inventoryFile,
      JSON.stringify({ vms: [{ name: "gpu-vm", id: VM_ID, hypervisor: "cloud-hypervisor", socket: path.join(dir, "gpu-vm.sock") }] }),
    );
    const auditFile = path.join(dir, "audit.jsonl");
    const audit = await serverWith({ inventoryFile, detachTimeoutMs: 300, server: { audit: AuditLog.open(auditFile) } });

    await audit.client.attach({ vm: "a1b2c", pci: "01:00.0", id: "gpu0" });
    const { device } = await audit.client.attach({ vm: "a1b2c", pci: "/sys/bus/pci/devices/0000:01:00.1", id: "" });
    const detaching = audit.client.detach({ vm: "a1b2c", id: "gpu0" }, { timeoutMs: 10_000 });
    await waitFor(() => ch("gpu-vm").pendingRemovals().includes("gpu0"), "the removal is requested");
    ch("gpu-vm").guestEjects("gpu0");
    await detaching;
    // A Detach left pending still names the device it is removing; a refusal before resolving names no VM.
    expect(await failure(audit.client.detach({ vm: "gpu-vm", id: device!.id }))).toMatchObject({ reason: "DETACH_PENDING" });
    expect(await failure(audit.client.attach({ vm: "a1b2c", pci: "/etc/passwd", id: "" }))).toMatchObject({ reason: "INVALID_ARGUMENT" });

    const entries = readAuditLog(auditFile);
    const resolved = { vm: VM_ID, vmName: "gpu-vm", caller: expect.any(String), requestId: expect.any(String), ms: expect.any(Number) };
    expect(entries).toEqual([
      { time: expect.any(String), ...resolved, method: "Attach", vmRef: "a1b2c", device: "0000:01:00.0", id: "gpu0", outcome: "OK", code: 0 },
      { time: expect.any(String), ...resolved, method: "Attach", vmRef: "a1b2c", device: "0000:01:00.1", id: device!.id, outcome: "OK", code: 0 },
      { time: expect.any(String), ...resolved, method: "Detach", vmRef: "a1b2c", device: "0000:01:00.0", id: "gpu0", outcome: "OK", code: 0 },
      {
        time: expect.any(String),
        ...resolved,
        method: "Detach",
        vmRef: "gpu-vm",
        device: "0000:01:00.1",
        id: device!.id,
        outcome: "DETACH_PENDING",
        code: grpc.status.DEADLINE_EXCEEDED,
      },
      {
        time: expect.any(String),
        ...resolved,
        vm: "",
        vmName: "",
        method: "Attach",
        vmRef: "a1b2c",
        device: "",
        id: "",
        outcome: "INVALID_ARGUMENT",
        code: grpc.status.INVALID_ARGUMENT,
      },
    ]);
    expect(new Set(entries.map((e) => e.requestId)).size).toBe(entries.length);
  });
});

describe("expected refusals are one info line without a stack (issue 8 item 16)", () => {
  test.each([
    ["INVALID_ARGUMENT", "Attach", { vm: "gpu-vm", pci: "/etc/passwd", id: "" }],
    ["VM_NOT_FOUND", "List", { vm: "nope" }],
    ["VM_NOT_RUNNING", "Attach", { vm: "created-vm", pci: "01:00.0", id: "" }],
    ["DEVICE_NOT_VFIO", "Attach", { vm: "gpu-vm", pci: "02:00.0", id: "" }],
    ["BACKEND_UNSUPPORTED", "Attach", { vm: "fc-vm", pci: "01:00.0", id: "" }],
    ["DEVICE_NOT_ATTACHED", "Detach", { vm: "gpu-vm", id: "ghost" }],
    ["DEVICE_IN_USE", "Attach", { vm: "other-vm", pci: "01:00.0", id: "" }],
  ] as const)("%s (%s)", async (reason, method, request) => {
    const other = await chVm("other-vm", "Running");
    const inventoryFile = path.join(dir, "logged.json");
    const vms = JSON.parse(fs.readFileSync(path.join(dir, "inventory.json"), "utf8")) as { vms: unknown[] };
    fs.writeFileSync(inventoryFile, JSON.stringify({ vms: [...vms.vms, other] }));
    const { log, lines } = capturingLogger("info");
    const logged = await serverWith({ inventoryFile, log });
    if (reason === "DEVICE_IN_USE") await logged.client.attach({ vm: "gpu-vm", pci: "01:00.0", id: "gpu0" });

    const requestId = `refusal-${reason.toLowerCase()}`;
    const metadata = new grpc.Metadata();
    metadata.set("x-request-id", requestId);
    const call = method === "List" ? logged.client.list(request as { vm: string }, { metadata })
      : method === "Detach" ? logged.client.detach(request as { vm: string; id: string }, { metadata })
      : logged.client.attach(request as { vm: string; pci: string; id: string }, { metadata });
    const err = await failure(call);
    expect(err.reason).toBe(reason);

    const mine = lines.filter((line) => line.requestId === requestId);
    expect(mine).toEqual([
      expect.objectContaining({ level: 30, msg: `${method} refused`, method, requestId, reason, code: grpc.status[err.code], message: err.message }),
    ]);
    expect(mine[0]).not.toHaveProperty("err");
    expect(JSON.stringify(mine[0])).not.toMatch(/stack|\n\s+at /);
  });
});

/** A unary call made by hand, to see the response's initial metadata and trailers. */
function rawUnary(
  address: string,
  method: string,
  request: Uint8Array,
  metadata: grpc.Metadata,
): Promise<{ initial: grpc.Metadata | undefined; status: grpc.StatusObject }> {
  const client = new grpc.Client(address, grpc.credentials.createInsecure());
  return new Promise((resolve) => {
    let initial: grpc.Metadata | undefined;
    const call = client.makeUnaryRequest(
      method,
      (bytes: Buffer) => bytes,
      (bytes: Buffer) => bytes,
      Buffer.from(request),
      metadata,
      () => undefined,
    );
    call.on("metadata", (m: grpc.Metadata) => (initial = m));
    call.on("status", (status: grpc.StatusObject) => {
      client.close();
      resolve({ initial, status });
    });
  });
}

describe("request ids (issue 10 item 5)", () => {
  const LIST = "/vfiod.v1.DeviceService/List";
  const ATTACH = "/vfiod.v1.DeviceService/Attach";
  const listOf = (vm: string) => toBinary(ListRequestSchema, create(ListRequestSchema, { vm }));
  const withId = (id: string | undefined) => {
    const metadata = new grpc.Metadata();
    if (id !== undefined) metadata.set("x-request-id", id);
    return metadata;
  };
  const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/;

  let logged: TestServer;
  let lines: LogLine[];
  let auditFile: string;
  beforeEach(async () => {
    const capture = capturingLogger("debug");
    lines = capture.lines;
    auditFile = path.join(dir, "audit.jsonl");
    logged = await serverWith({ log: capture.log, server: { audit: AuditLog.open(auditFile) } });
  });

  test("the caller's id comes back in the initial metadata and the trailers, and is on the log line", async () => {
    const id = `ctl-${randomUUID()}`;
    const { initial, status } = await rawUnary(logged.address, LIST, listOf("gpu-vm"), withId(id));
    expect(status.code).toBe(grpc.status.OK);
    expect(initial?.get("x-request-id")).toEqual([id]);
    expect(status.metadata.get("x-request-id")).toEqual([id]);
    expect(lines.filter((l) => l.requestId === id)).toEqual([expect.objectContaining({ msg: "List done", method: "List" })]);
  });

  test("on a refusal too, and on the audit line of a mutation", async () => {
    const id = "attach-7f3a";
    const request = toBinary(AttachRequestSchema, create(AttachRequestSchema, { vm: "created-vm", pci: "01:00.0", id: "" }));
    const { initial, status } = await rawUnary(logged.address, ATTACH, request, withId(id));
    expect(status.code).toBe(grpc.status.FAILED_PRECONDITION);
    expect(initial?.get("x-request-id")).toEqual([id]);
    expect(status.metadata.get("x-request-id")).toEqual([id]);
    expect(lines.filter((l) => l.requestId === id)).toEqual([expect.objectContaining({ msg: "Attach refused", reason: "VM_NOT_RUNNING" })]);
    expect(readAuditLog(auditFile)).toEqual([expect.objectContaining({ requestId: id, method: "Attach", outcome: "VM_NOT_RUNNING" })]);
  });

  test("the typed client's error carries it in its trailers", async () => {
    const err = (await logged.client.list({ vm: "nope" }, { metadata: withId("typed-1") }).catch((e: unknown) => e)) as grpc.ServiceError;
    expect(errorReason(err)).toBe("VM_NOT_FOUND");
    expect(err.metadata.get("x-request-id")).toEqual(["typed-1"]);
  });

  test.each([
    ["none sent", undefined],
    ["one with a space", "has space"],
    ["one of 129 characters", "x".repeat(129)],
    ["an empty one", ""],
  ])("%s: vfiod makes a UUID, sends it back and logs it", async (_what, sent) => {
    const { initial, status } = await rawUnary(logged.address, LIST, listOf("gpu-vm"), withId(sent));
    const [made] = initial?.get("x-request-id") ?? [];
    expect(made).toMatch(UUID);
    expect(status.metadata.get("x-request-id")).toEqual([made]);
    expect(lines.filter((l) => l.requestId === made)).toHaveLength(1);
    if (sent !== undefined && sent !== "") expect(lines.some((l) => l.requestId === sent)).toBe(false);
  });

  test("an id of exactly 128 printable characters is kept", async () => {
    const id = `${"a".repeat(120)}!~:/._-#`;
    expect(id).toHaveLength(128);
    const { initial } = await rawUnary(logged.address, LIST, listOf("gpu-vm"), withId(id));
    expect(initial?.get("x-request-id")).toEqual([id]);
  });
});
