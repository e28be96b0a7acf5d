// DeviceService over real gRPC against real QEMU (Debian's qemu-system-x86_64):
// refusals that must not reach QEMU, QEMU's own errors, slot exhaustion and a
// busy monitor. A successful vfio-pci realize needs VFIO hardware: see test/lab;
// the QMP double (test/support/qmp-double.ts) stands in for it below, for removals
// the guest acknowledges late or never.
import * as grpc from "@grpc/grpc-js";
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { buildFakeSysfs, type FakeSysfs } from "../support/fake-sysfs";
import { QmpDouble } from "../support/qmp-double";
import { qemuAvailable, startQemu, type QemuVm } from "../support/qemu-vm";
import { failure, startTestServer, type TestServer } from "../support/test-server";

const describeQemu = qemuAvailable() ? describe : describe.skip;

/** A BDF this machine does not have, so QEMU can only answer "no such host device". */
const ABSENT_BDF = "0000:7f:1f.7";

describeQemu("against real QEMU", () => {
  let dir: string;
  let sysfs: FakeSysfs;
  let server: TestServer;
  const vms: Record<string, QemuVm> = {};

  beforeAll(async () => {
    expect(fs.existsSync(`/sys/bus/pci/devices/${ABSENT_BDF}`)).toBe(false);
    dir = fs.mkdtempSync(path.join(os.tmpdir(), "vfiod-qgrpc-"));
    sysfs = buildFakeSysfs([
      { bdf: ABSENT_BDF, driver: "vfio-pci", group: 40 },
      { bdf: "0000:7f:1e.0", driver: "e1000e", group: 41 },
    ]);
    [vms.running, vms.prelaunch, vms.full] = await Promise.all([
      startQemu({ rootPorts: 2 }),
      startQemu({ rootPorts: 2, args: ["-S"] }),
      startQemu({ rootPorts: 1, args: ["-device", "e1000e,id=nic1,bus=rp1"] }),
    ]);
    const inventoryFile = path.join(dir, "inventory.json");
    fs.writeFileSync(
      inventoryFile,
      JSON.stringify({ vms: Object.entries(vms).map(([name, vm]) => ({ name, hypervisor: "qemu", socket: vm.socket })) }),
    );
    server = await startTestServer({ inventoryFile, sysfsRoot: sysfs.root });
  }, 60_000);

  afterAll(async () => {
    await server.stop();
    await Promise.all(Object.values(vms).map((vm) => vm.stop()));
    sysfs.cleanup();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  /** Holds QEMU's only monitor connection: anything vfiod sent QEMU now would hang until UNAVAILABLE. */
  async function holdingMonitor<T>(vm: QemuVm, fn: () => Promise<T>): Promise<T> {
    const socket = net.createConnection(vm.socket);
    await new Promise<void>((resolve, reject) => socket.once("connect", resolve).once("error", reject));
    try {
      return await fn();
    } finally {
      socket.destroy();
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
  }

  test("List of a fresh VM is empty", async () => {
    expect((await server.client.list({ vm: "running" })).devices).toEqual([]);
  });

  test.each([
    ["bad PCI input", { pci: "/etc/passwd" }, grpc.status.INVALID_ARGUMENT, "INVALID_ARGUMENT"],
    ["bad id", { id: "1 bad id" }, grpc.status.INVALID_ARGUMENT, "INVALID_ARGUMENT"],
    ["device not vfio-bound", { pci: "7f:1e.0" }, grpc.status.FAILED_PRECONDITION, "DEVICE_NOT_VFIO"],
    ["device missing", { pci: "7f:00.0" }, grpc.status.NOT_FOUND, "DEVICE_NOT_FOUND"],
  ])("%s is refused at once without reaching QEMU", async (_name, change, code, reason) => {
    await holdingMonitor(vms.running!, async () => {
      const started = Date.now();
      expect(await failure(server.client.attach({ vm: "running", pci: ABSENT_BDF, id: "hostdev9", ...change }))).toMatchObject({
        code,
        reason,
      });
      // At once: had it reached QEMU, whose monitor is held, the answer would be UNAVAILABLE after its 2 s greeting bound.
      expect(Date.now() - started).toBeLessThan(4000);
    });
  });

  test("a VM in prelaunch is VM_NOT_RUNNING and QEMU gets no device", async () => {
    expect(await failure(server.client.attach({ vm: "prelaunch", pci: ABSENT_BDF, id: "" }))).toMatchObject({
      code: grpc.status.FAILED_PRECONDITION,
      reason: "VM_NOT_RUNNING",
    });
    expect((await server.client.list({ vm: "prelaunch" })).devices).toEqual([]);
  });

  test("QEMU's own refusal comes back with its text: no such host device is DEVICE_NOT_FOUND", async () => {
    const err = await failure(server.client.attach({ vm: "running", pci: ABSENT_BDF, id: "hostdev1" }));
    expect(err).toMatchObject({ code: grpc.status.NOT_FOUND, reason: "DEVICE_NOT_FOUND" });
    expect(err.message).toContain("no such host device");
    expect((await server.client.list({ vm: "running" })).devices).toEqual([]);
  });

  test("no free root port is RESOURCE_EXHAUSTED (NO_FREE_SLOT) with a hint", async () => {
    const err = await failure(server.client.attach({ vm: "full", pci: ABSENT_BDF, id: "" }));
    expect(err).toMatchObject({ code: grpc.status.RESOURCE_EXHAUSTED, reason: "NO_FREE_SLOT" });
    expect(err.message).toContain("pcie-root-port");
  });

  test("Detach of the VM's own NIC is refused: vfiod only removes vfio-pci devices", async () => {
    expect(await failure(server.client.detach({ vm: "full", id: "nic1" }))).toMatchObject({
      code: grpc.status.NOT_FOUND,
      reason: "DEVICE_NOT_ATTACHED",
    });
  });

  test("a second QMP client holding the monitor gives UNAVAILABLE within the deadline, not a hang", async () => {
    await holdingMonitor(vms.running!, async () => {
      const started = Date.now();
      const err = await failure(server.client.list({ vm: "running" }, { timeoutMs: 8000 }));
      expect(err).toMatchObject({ code: grpc.status.UNAVAILABLE, reason: "HYPERVISOR_UNAVAILABLE" });
      expect(err.message).toMatch(/busy/);
      expect(Date.now() - started).toBeLessThan(8000);
    });
  });
});

// A QMP double whose vfio-pci realizes, and whose guest acknowledges a removal only when told.
describe.each(["acpi", "native"] as const)("against the QMP double, %s hot-plug", (hotplug) => {
  const GPU = "0000:01:00.0";
  let dir: string;
  let sysfs: FakeSysfs;
  let qmp: QmpDouble;
  let server: TestServer;

  beforeEach(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), "vfiod-qdouble-"));
    sysfs = buildFakeSysfs([{ bdf: GPU, driver: "vfio-pci", group: 12 }]);
    qmp = await QmpDouble.start({ hotplug, unplugAfterMs: null, hostDevices: [GPU] });
    const inventoryFile = path.join(dir, "inventory.json");
    fs.writeFileSync(inventoryFile, JSON.stringify({ vms: [{ name: "q", hypervisor: "qemu", socket: qmp.socket }] }));
    server = await startTestServer({ inventoryFile, sysfsRoot: sysfs.root, detachTimeoutMs: 300 });
  });

  afterEach(async () => {
    await server.stop();
    await qmp.close();
    sysfs.cleanup();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  async function pendingRemoval(): Promise<void> {
    expect((await server.client.attach({ vm: "q", pci: "01:00.0", id: "gpu0" })).device).toMatchObject({ id: "gpu0", bdf: GPU });
    expect(await failure(server.client.detach({ vm: "q", id: "gpu0" }))).toMatchObject({
      code: grpc.status.DEADLINE_EXCEEDED,
      reason: "DETACH_PENDING",
    });
  }

  test("Attach of a device whose removal is pending is refused, saying so, under its id or another (issue 8 item 5)", async () => {
    await pendingRemoval();
    const sameId = await failure(server.client.attach({ vm: "q", pci: "01:00.0", id: "gpu0" }));
    expect(sameId).toMatchObject({ code: grpc.status.ALREADY_EXISTS, reason: "ID_IN_USE" });
    expect(sameId.message).toContain("removal is pending");
    const otherId = await failure(server.client.attach({ vm: "q", pci: "01:00.0", id: "gpu1" }));
    expect(otherId).toMatchObject({ code: grpc.status.ALREADY_EXISTS, reason: "DEVICE_ALREADY_ATTACHED" });
    expect(otherId.message).toContain("removal is pending");
    expect(otherId.message).toContain('"gpu0"');
    expect(qmp.commands("device_add")).toHaveLength(1);
    // Once the guest lets go, the same Attach goes through.
    qmp.completeUnplugs();
    expect((await server.client.attach({ vm: "q", pci: "01:00.0", id: "gpu0" })).device).toMatchObject({ id: "gpu0", bdf: GPU });
  });

  test("DETACH_PENDING, the guest acknowledges, Detach again answers OK (and again), with one device_del (issue 8 item 7)", async () => {
    await pendingRemoval();
    qmp.completeUnplugs();
    await expect(server.client.detach({ vm: "q", id: "gpu0" })).resolves.toBeDefined();
    await expect(server.client.detach({ vm: "q", id: "gpu0" })).resolves.toBeDefined();
    expect(qmp.commands("device_del")).toHaveLength(1);
    expect((await server.client.list({ vm: "q" })).devices).toEqual([]);
  });

  test("with a List between the acknowledgement and the retry, the retry is still OK (issue 8 item 7)", async () => {
    await pendingRemoval();
    qmp.completeUnplugs();
    expect((await server.client.list({ vm: "q" })).devices).toEqual([]);
    await expect(server.client.detach({ vm: "q", id: "gpu0" })).resolves.toBeDefined();
    expect(qmp.commands("device_del")).toHaveLength(1);
  });

  test("an id vfiod never removed is DEVICE_NOT_ATTACHED (issue 8 item 7)", async () => {
    await pendingRemoval();
    qmp.completeUnplugs();
    expect(await failure(server.client.detach({ vm: "q", id: "gpu1" }))).toMatchObject({
      code: grpc.status.NOT_FOUND,
      reason: "DEVICE_NOT_ATTACHED",
    });
  });
});
