// QemuBackend against real QEMU 7.2 for everything it can show without VFIO
// hardware, and against the QMP double for a vfio-pci that realizes and a guest
// that acknowledges (or never acknowledges) removal.
import fs from "node:fs";
import { QemuBackend } from "../../../src/backends/qemu/backend";
import { QmpClient } from "../../../src/backends/qemu/qmp";
import { Code, type VfiodError } from "../../../src/errors";
import type { VmRecord } from "../../../src/inventory/vm";
import { parsePciAddress } from "../../../src/pci/address";
import { QmpDouble, type QmpDoubleOptions } from "../../support/qmp-double";
import { qemuAvailable, startQemu, stopAllQemu } from "../../support/qemu-vm";
import { vfiodRejection } from "../../support/rejection";
import { waitFor } from "../../support/wait";

const signal = (ms = 10_000) => AbortSignal.timeout(ms);


/** A host device that does not exist on this machine: tests never touch real PCI devices. */
function absentDevice(bdf: string) {
  const device = parsePciAddress(bdf);
  if (fs.existsSync(device.path)) throw new Error(`${device.path} exists here; pick another absent BDF`);
  return device;
}

/** Runs one QMP command in a session of its own, as another tool would. */
async function qmp(socket: string, command: string, args?: Record<string, unknown>): Promise<unknown> {
  const client = await QmpClient.connect(socket, { label: "test", signal: signal() });
  try {
    return await client.execute(command, args, signal());
  } finally {
    client.close();
  }
}

/** The ids of the devices QEMU holds, of every type. */
const peripheralNames = async (socket: string) =>
  ((await qmp(socket, "qom-list", { path: "/machine/peripheral" })) as { name: string; type: string }[])
    .filter((p) => p.type.startsWith("child<"))
    .map((p) => p.name)
    .sort();

const describeQemu = qemuAvailable() ? describe : describe.skip;

describeQemu("QemuBackend against real QEMU", () => {
  afterEach(stopAllQemu);
  const backend = new QemuBackend();

  test("List of a fresh VM is empty, also in prelaunch", async () => {
    const running = await startQemu();
    const prelaunch = await startQemu({ args: ["-S"] });
    await expect(backend.list(running.record, signal())).resolves.toEqual([]);
    await expect(backend.list(prelaunch.record, signal())).resolves.toEqual([]);
  });

  test("Attach to a prelaunch (-S) VM → VM_NOT_RUNNING, nothing added", async () => {
    const vm = await startQemu({ args: ["-S"] });
    const err = await vfiodRejection(backend.attach(vm.record, absentDevice("0000:7f:1f.7"), "gpu0", signal()));
    // Had device_add been sent, QEMU would have answered "no such host device" instead.
    expect(err).toMatchObject({ reason: "VM_NOT_RUNNING", code: Code.FAILED_PRECONDITION });
    expect(err.message).toContain('"prelaunch"');
    expect(await peripheralNames(vm.socket)).toEqual(["rp1", "rp2"]);
  });

  test("Attach to a paused VM → VM_PAUSED", async () => {
    const vm = await startQemu();
    await qmp(vm.socket, "stop");
    const err = await vfiodRejection(backend.attach(vm.record, absentDevice("0000:7f:1f.7"), "", signal()));
    expect(err).toMatchObject({ reason: "VM_PAUSED", code: Code.FAILED_PRECONDITION, meta: { status: "paused" } });
  });

  test("QEMU's own device_add refusal comes back with its text: no such host device → DEVICE_NOT_FOUND", async () => {
    const vm = await startQemu();
    for (const bdf of ["0000:7f:1f.7", "10000:7f:1f.7"]) {
      const device = absentDevice(bdf);
      const err = await vfiodRejection(backend.attach(vm.record, device, "", signal()));
      expect(err).toMatchObject({ reason: "DEVICE_NOT_FOUND", code: Code.NOT_FOUND, meta: { qmpClass: "GenericError" } });
      // The 5-digit VMD domain reaches QEMU intact because vfiod passes sysfsdev, not host.
      expect(err.message).toContain(`vfio ${device.path}: no such host device`);
    }
    expect(await peripheralNames(vm.socket)).toEqual(["rp1", "rp2"]);
  });

  test("all root ports occupied → NO_FREE_SLOT with the boot hint", async () => {
    const vm = await startQemu({ args: ["-device", "e1000e,id=nic1,bus=rp1", "-device", "e1000e,id=nic2,bus=rp2"] });
    const err = await vfiodRejection(backend.attach(vm.record, absentDevice("0000:7f:1f.7"), "", signal()));
    expect(err).toMatchObject({ reason: "NO_FREE_SLOT", code: Code.RESOURCE_EXHAUSTED });
    expect(err.message).toContain("-device pcie-root-port");
  });

  test("an id held by a NIC → ID_IN_USE; Detach of the NIC → DEVICE_NOT_ATTACHED and the NIC stays", async () => {
    const vm = await startQemu({ args: ["-device", "e1000e,id=nic1,bus=rp1"] });
    const inUse = await vfiodRejection(backend.attach(vm.record, absentDevice("0000:7f:1f.7"), "nic1", signal()));
    expect(inUse).toMatchObject({ reason: "ID_IN_USE", code: Code.ALREADY_EXISTS });
    const nic = await vfiodRejection(backend.detach(vm.record, "nic1", 1000, signal()));
    expect(nic).toMatchObject({ reason: "DEVICE_NOT_ATTACHED", code: Code.NOT_FOUND });
    expect(nic.message).toContain("e1000e, not a vfio-pci device");
    const absent = await vfiodRejection(backend.detach(vm.record, "hostdev0", 1000, signal()));
    expect(absent).toMatchObject({ reason: "DEVICE_NOT_ATTACHED", code: Code.NOT_FOUND });
    await new Promise((resolve) => setTimeout(resolve, 300)); // time for an (unwanted) unplug to land
    expect(await peripheralNames(vm.socket)).toEqual(["nic1", "rp1", "rp2"]);
  });

  test("another QMP client connected → UNAVAILABLE within the deadline, not a hang", async () => {
    const vm = await startQemu();
    const other = await QmpClient.connect(vm.socket, { label: "other", signal: signal() });
    try {
      const started = Date.now();
      const err = await vfiodRejection(backend.list(vm.record, signal(20_000)));
      // UNAVAILABLE, not DEADLINE_EXCEEDED: the 2 s greeting bound answered (4x room for a loaded machine).
      expect(Date.now() - started).toBeLessThan(4 * 2000);
      expect(err).toMatchObject({ reason: "HYPERVISOR_UNAVAILABLE", code: Code.UNAVAILABLE });
      expect(err.message).not.toContain(vm.socket);
    } finally {
      other.close();
    }
  });

  test("concurrent operations on one VM wait for each other instead of finding the monitor busy", async () => {
    const vm = await startQemu();
    const results = await Promise.allSettled([
      backend.list(vm.record, signal()),
      backend.attach(vm.record, absentDevice("0000:7f:1f.7"), "", signal()),
      backend.list(vm.record, signal()),
      backend.detach(vm.record, "hostdev0", 1000, signal()),
      backend.list(vm.record, signal()),
    ]);
    const reasons = results.map((r) => (r.status === "fulfilled" ? "ok" : (r.reason as VfiodError).reason));
    expect(reasons).toEqual(["ok", "DEVICE_NOT_FOUND", "ok", "DEVICE_NOT_ATTACHED", "ok"]);
  });
});

describe("QemuBackend against the QMP double", () => {
  const GPU = parsePciAddress("0000:01:00.0");
  const NIC = { id: "nic1", driver: "e1000e", bus: "rp1" };
  let double: QmpDouble | undefined;
  let vm: VmRecord;
  const start = async (options: QmpDoubleOptions = {}) => {
    double = await QmpDouble.start({ hostDevices: [GPU.bdf], ...options });
    vm = { id: "vm-1", name: "d1", hypervisor: "qemu", socket: double.socket, source: "inventory" };
    return double;
  };
  afterEach(async () => {
    await double?.close();
    double = undefined;
  });
  const backend = new QemuBackend({ pollIntervalMs: 100 });

  test("Attach puts vfio-pci on the first free root port and returns the guest address; List shows it", async () => {
    const d = await start({ devices: [NIC] });
    const device = await backend.attach(vm, GPU, "", signal());
    expect(device).toEqual({ id: "hostdev0", bdf: GPU.bdf, path: GPU.path, guestBdf: "0000:02:00.0" });
    expect(d.commands("device_add")).toEqual([
      { execute: "device_add", arguments: { driver: "vfio-pci", id: "hostdev0", bus: "rp2", sysfsdev: GPU.path } },
    ]);
    await expect(backend.list(vm, signal())).resolves.toEqual([device]);
  });

  test("a retried Attach (same id, same device) returns the device and sends no device_add", async () => {
    const d = await start();
    const first = await backend.attach(vm, GPU, "gpu0", signal());
    await expect(backend.attach(vm, GPU, "gpu0", signal())).resolves.toEqual(first);
    const elsewhere = await vfiodRejection(backend.attach(vm, GPU, "gpu1", signal()));
    expect(elsewhere).toMatchObject({ reason: "DEVICE_ALREADY_ATTACHED", code: Code.ALREADY_EXISTS, meta: { id: "gpu0" } });
    expect(elsewhere.message).toContain('"gpu0"');
    const other = parsePciAddress("0000:02:00.0");
    await expect(backend.attach(vm, other, "gpu0", signal())).rejects.toMatchObject({ reason: "ID_IN_USE" });
    expect(d.commands("device_add")).toHaveLength(1);
  });

  test("List before the firmware numbered the buses gives no guest address", async () => {
    await start({ status: "prelaunch", devices: [{ id: "gpu0", driver: "vfio-pci", bus: "rp1", sysfsdev: GPU.path }, NIC] });
    await expect(backend.list(vm, signal())).resolves.toEqual([{ id: "gpu0", bdf: GPU.bdf, path: GPU.path, guestBdf: "" }]);
  });

  test("prelaunch → VM_NOT_RUNNING with no device_add sent", async () => {
    const d = await start({ status: "prelaunch" });
    await expect(backend.attach(vm, GPU, "", signal())).rejects.toMatchObject({ reason: "VM_NOT_RUNNING" });
    expect(d.commands("device_add")).toEqual([]);
  });

  test("a non-viable IOMMU group → IOMMU_GROUP_NOT_VIABLE with QEMU's text", async () => {
    await start({ nonViable: { [GPU.bdf]: 12 } });
    const err = await vfiodRejection(backend.attach(vm, GPU, "", signal()));
    expect(err).toMatchObject({ reason: "IOMMU_GROUP_NOT_VIABLE", code: Code.FAILED_PRECONDITION });
    expect(err.message).toContain("vfio 0000:01:00.0: group 12 is not viable");
  });

  test("Detach returns on DEVICE_DELETED (sent after 50 ms)", async () => {
    const d = await start({ unplugAfterMs: 50 });
    await backend.attach(vm, GPU, "gpu0", signal());
    // Polling too slowly to matter: only the event can end the wait in time.
    const eventOnly = new QemuBackend({ pollIntervalMs: 60_000 });
    const started = Date.now();
    await eventOnly.detach(vm, "gpu0", 5000, signal());
    expect(Date.now() - started).toBeLessThan(2000);
    expect(d.commands("device_del")).toEqual([{ execute: "device_del", arguments: { id: "gpu0" } }]);
    await expect(backend.list(vm, signal())).resolves.toEqual([]);
  });

  test("ACPI hot-plug, a guest that never releases → DETACH_PENDING after waitMs; a repeated Detach only waits again", async () => {
    const d = await start({ hotplug: "acpi", unplugAfterMs: null });
    await backend.attach(vm, GPU, "gpu0", signal());
    for (let attempt = 0; attempt < 2; attempt++) {
      const started = Date.now();
      const err = await vfiodRejection(backend.detach(vm, "gpu0", 400, signal()));
      const elapsed = Date.now() - started;
      expect(err).toMatchObject({ reason: "DETACH_PENDING", code: Code.DEADLINE_EXCEEDED, meta: { id: "gpu0" } });
      expect(elapsed).toBeGreaterThanOrEqual(390);
      expect(elapsed).toBeLessThan(2000);
    }
    expect(d.commands("device_del")).toHaveLength(1);
    await expect(backend.list(vm, signal())).resolves.toHaveLength(1);

    // The guest acks while nobody is connected: the event is lost, a fresh read tells.
    d.completeUnplugs();
    await backend.detach(vm, "gpu0", 400, signal());
    expect(d.commands("device_del")).toHaveLength(1);
  });

  test("ACPI hot-plug: after DETACH_PENDING a second Detach sends no device_del and completes when the guest acks", async () => {
    // QEMU would accept a repeat ({} and the guest notified again): vfiod must not rely on that, nor send one.
    const d = await start({ hotplug: "acpi", unplugAfterMs: null });
    await backend.attach(vm, GPU, "gpu0", signal());
    await expect(backend.detach(vm, "gpu0", 200, signal())).rejects.toMatchObject({
      reason: "DETACH_PENDING",
      code: Code.DEADLINE_EXCEEDED,
    });
    expect(d.answersTo("device_del")).toEqual([{ return: {} }]);

    const before = d.log.length;
    const again = backend.detach(vm, "gpu0", 30_000, signal(40_000));
    // The guest acks only once the second Detach waits: it has read the device (qom-get), then polled (qom-list).
    await waitFor(() => {
      const since = d.log.slice(before).map((c) => c.execute);
      return since.includes("qom-get") && since.lastIndexOf("qom-list") > since.indexOf("qom-get");
    }, "the second Detach waits for the guest");
    d.completeUnplugs();
    await expect(again).resolves.toMatchObject({ id: "gpu0", bdf: "0000:01:00.0" });
    expect(d.commands("device_del")).toHaveLength(1);
    await expect(backend.list(vm, signal())).resolves.toEqual([]);
  });

  describe.each([
    ["already in the process of unplug", 60_000, "Device gpu0 is already in the process of unplug"],
    ["guest is busy", 0, "Hot-unplug failed: guest is busy (power indicator blinking)"],
  ])("native PCIe hot-plug, a restarted vfiod's device_del answered %j", (_name, nativeUnplugRepeatMs, desc) => {
    // A restarted vfiod has forgotten the removal it asked for: it sends device_del again,
    // and QEMU's refusal means that removal is under way, not that Detach failed.
    const restartedDetach = (waitMs: number, callSignal = signal()) =>
      new QemuBackend({ pollIntervalMs: 100 }).detach(vm, "gpu0", waitMs, callSignal);
    const startPending = async () => {
      const d = await start({ hotplug: "native", nativeUnplugRepeatMs, unplugAfterMs: null });
      await backend.attach(vm, GPU, "gpu0", signal());
      await expect(backend.detach(vm, "gpu0", 100, signal())).rejects.toMatchObject({ reason: "DETACH_PENDING" });
      return d;
    };

    test("Detach waits, then answers DETACH_PENDING (DEADLINE_EXCEEDED), never HYPERVISOR_ERROR", async () => {
      const d = await startPending();
      const started = Date.now();
      const err = await vfiodRejection(restartedDetach(400));
      const elapsed = Date.now() - started;
      expect(d.answersTo("device_del")).toEqual([{ return: {} }, { error: { class: "GenericError", desc } }]);
      expect(err).toMatchObject({ reason: "DETACH_PENDING", code: Code.DEADLINE_EXCEEDED, meta: { id: "gpu0" } });
      expect(elapsed).toBeGreaterThanOrEqual(390);
      await expect(backend.list(vm, signal())).resolves.toHaveLength(1);
    });

    test("Detach waits, then answers OK when the guest acks", async () => {
      const d = await startPending();
      const detaching = restartedDetach(30_000, signal(40_000));
      await waitFor(() => d.commands("device_del").length === 2, "the restarted vfiod sends device_del");
      d.completeUnplugs();
      await expect(detaching).resolves.toMatchObject({ id: "gpu0", bdf: "0000:01:00.0" });
      expect(d.answersTo("device_del")).toEqual([{ return: {} }, { error: { class: "GenericError", desc } }]);
      await expect(backend.list(vm, signal())).resolves.toEqual([]);
    });
  });

  test("the caller's deadline during the wait → DETACH_PENDING; a cancelled call → CANCELLED", async () => {
    await start({ unplugAfterMs: null });
    await backend.attach(vm, GPU, "gpu0", signal());
    const started = Date.now();
    await expect(backend.detach(vm, "gpu0", 10_000, signal(300))).rejects.toMatchObject({
      reason: "DETACH_PENDING",
      code: Code.DEADLINE_EXCEEDED,
    });
    expect(Date.now() - started).toBeLessThan(2000);
    const call = new AbortController();
    setTimeout(() => call.abort(), 200);
    await expect(backend.detach(vm, "gpu0", 10_000, call.signal)).rejects.toMatchObject({ code: Code.CANCELLED });
  });

  test("device_add ran but its reply was lost (monitor closed after it) → UNAVAILABLE 'may have been added'; List shows it", async () => {
    const d = await start({ hangUpAfter: "device_add" });
    const err = await vfiodRejection(backend.attach(vm, GPU, "", signal()));
    expect(err).toMatchObject({ reason: "HYPERVISOR_UNAVAILABLE", code: Code.UNAVAILABLE });
    expect(err.message).toContain("device_add: QMP connection closed by QEMU; the device may have been added: List to check");
    expect(d.answersTo("device_add")).toEqual(["hung up"]);
    const listed = await backend.list(vm, signal());
    expect(listed).toEqual([{ id: "hostdev0", bdf: GPU.bdf, path: GPU.path, guestBdf: "0000:01:00.0" }]);
    // The caller's retry with the id List showed is the idempotent answer: no second device_add.
    await expect(backend.attach(vm, GPU, "hostdev0", signal())).resolves.toEqual(listed[0]);
    expect(d.commands("device_add")).toHaveLength(1);
  });

  test("the monitor closing before it ran device_add → the same UNAVAILABLE; List shows nothing added", async () => {
    const d = await start({ hangUpBefore: "device_add" });
    const err = await vfiodRejection(backend.attach(vm, GPU, "", signal()));
    expect(err).toMatchObject({ reason: "HYPERVISOR_UNAVAILABLE", code: Code.UNAVAILABLE });
    expect(err.message).toContain("the device may have been added: List to check");
    expect(d.commands("device_add")).toHaveLength(1);
    await expect(backend.list(vm, signal())).resolves.toEqual([]);
  });
});
