// Whole-group Attach and Detach over real gRPC: a GPU and its audio function (one
// IOMMU group, with a bridge in it too), on a Cloud Hypervisor double and a QMP
// double; all or nothing, with the rollback told.
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { ChDouble } from "../support/ch-double";
import { buildFakeSysfs, type FakeSysfs } from "../support/fake-sysfs";
import { rawVmInfo } from "../support/load";
import { QmpDouble } from "../support/qmp-double";
import { failure, startTestServer, type TestServer } from "../support/test-server";

const GPU = "0000:01:00.0";
const AUDIO = "0000:01:00.1";
const BRIDGE = "0000:00:1c.0";
const LONE = "0000:03:00.0";

let dir: string;
let sysfs: FakeSysfs;
let ch: ChDouble;
let qmp: QmpDouble;
let server: TestServer;

const sent = (endpoint: string) => ch.requests.filter((r) => r.endpoint === endpoint).map((r) => r.body);

beforeEach(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "vfiod-group-"));
  sysfs = buildFakeSysfs([
    { bdf: BRIDGE, driver: "pcieport", group: 12, pciClass: "0x060400" },
    { bdf: GPU, driver: "vfio-pci", group: 12 },
    { bdf: AUDIO, driver: "vfio-pci", group: 12, pciClass: "0x040300" },
    { bdf: "0000:02:00.0", driver: "vfio-pci", group: 13 },
    { bdf: "0000:02:00.1", driver: "snd_hda_intel", group: 13, pciClass: "0x040300" },
    { bdf: LONE, driver: "vfio-pci", group: 14 },
    { bdf: "0000:04:00.0", driver: "vfio-pci", group: 15 },
    { bdf: "0000:04:00.1", group: 15, pciClass: "0x040300" },
  ]);
  ch = await ChDouble.start(path.join(dir, "ch.sock"), { sysfsRoot: sysfs.root, ejectAfterMs: 5 });
  ch.setState("Running");
  qmp = await QmpDouble.start({ hostDevices: [GPU, AUDIO], rootPorts: 4 });
  const inventoryFile = path.join(dir, "inventory.json");
  fs.writeFileSync(
    inventoryFile,
    JSON.stringify({
      vms: [
        { name: "ch-vm", hypervisor: "cloud-hypervisor", socket: ch.socketPath },
        { name: "q-vm", hypervisor: "qemu", socket: qmp.socket },
      ],
    }),
  );
  server = await startTestServer({ inventoryFile, sysfsRoot: sysfs.root, detachTimeoutMs: 3000 });
});

afterEach(async () => {
  await server.stop();
  await ch.close();
  await qmp.close();
  sysfs.cleanup();
  fs.rmSync(dir, { recursive: true, force: true });
});

describe("Cloud Hypervisor", () => {
  test("attaches the device first, then its group's other endpoint (the bridge skipped), with a derived id; Detach takes both", async () => {
    const { device, companions } = await server.client.attach({ vm: "ch-vm", pci: "01:00.0", id: "gpu0", wholeGroup: true });
    expect(device).toMatchObject({ id: "gpu0", bdf: GPU });
    expect(companions.map((c) => ({ id: c.id, bdf: c.bdf }))).toEqual([{ id: "gpu0-01-00-1", bdf: AUDIO }]);
    expect(sent("vm.add-device")).toEqual([
      { id: "gpu0", path: `/sys/bus/pci/devices/${GPU}` },
      { id: "gpu0-01-00-1", path: `/sys/bus/pci/devices/${AUDIO}` },
    ]);
    const listed = (await server.client.list({ vm: "ch-vm" })).devices.map((d) => d.id).sort();
    expect(listed).toEqual(["gpu0", "gpu0-01-00-1"]);

    // A retry is answered from what the VM holds: nothing is sent.
    await server.client.attach({ vm: "ch-vm", pci: "01:00.0", id: "gpu0", wholeGroup: true });
    expect(sent("vm.add-device")).toHaveLength(2);

    await server.client.detach({ vm: "ch-vm", id: "gpu0", wholeGroup: true });
    // Companions first, then the device.
    expect(sent("vm.remove-device")).toEqual([{ id: "gpu0-01-00-1" }, { id: "gpu0" }]);
    expect((await server.client.list({ vm: "ch-vm" })).devices).toEqual([]);
  });

  test("without whole_group a Detach leaves the companions in place", async () => {
    await server.client.attach({ vm: "ch-vm", pci: GPU, id: "gpu0", wholeGroup: true });
    await server.client.detach({ vm: "ch-vm", id: "gpu0" });
    expect((await server.client.list({ vm: "ch-vm" })).devices.map((d) => d.id)).toEqual(["gpu0-01-00-1"]);
  });

  test("a companion the host cannot hand over is refused before anything is sent, naming it", async () => {
    // Unbound, the audio function keeps the group viable: the device alone may go, the group may not.
    const err = await failure(server.client.attach({ vm: "ch-vm", pci: "04:00.0", id: "gpu1", wholeGroup: true }));
    expect(err.reason).toBe("DEVICE_NOT_VFIO");
    expect(err.message).toContain("0000:04:00.1 is bound to no driver");
    expect(sent("vm.add-device")).toEqual([]);
    await expect(server.client.attach({ vm: "ch-vm", pci: "04:00.0", id: "gpu1" })).resolves.toMatchObject({ companions: [] });
  });

  test("a group that is not viable is refused as a whole, naming the member on a host driver", async () => {
    const err = await failure(server.client.attach({ vm: "ch-vm", pci: "02:00.0", id: "gpu1", wholeGroup: true }));
    expect(err.reason).toBe("IOMMU_GROUP_NOT_VIABLE");
    expect(err.message).toContain("0000:02:00.1 (driver snd_hda_intel)");
    expect(sent("vm.add-device")).toEqual([]);
  });

  test("a companion that fails at the hypervisor: what this call attached is removed again, and the answer says so", async () => {
    // The first add goes through, the second fails the way a VFIO open does.
    ch.inject("vm.add-device", { kind: "delay", ms: 0 });
    const chain = ["Error from API", "The device could not be added to the VM", "Error from device manager", "Cannot create a VFIO device", "group is not viable"];
    ch.inject("vm.add-device", { kind: "respond", status: 500, body: JSON.stringify(chain) });
    const err = await failure(server.client.attach({ vm: "ch-vm", pci: GPU, id: "gpu0", wholeGroup: true }));
    expect({ code: err.code, reason: err.reason }).toEqual({ code: 13, reason: "HYPERVISOR_ERROR" });
    expect(err.message).toContain(`failed at ${AUDIO}`);
    expect(err.message).toContain("group is not viable");
    expect(err.message).toContain(`rolled back: gpu0 (${GPU}) removed again`);
    expect(sent("vm.remove-device")).toEqual([{ id: "gpu0" }]);
    const info = await rawVmInfo(ch.socketPath);
    expect(info.config.devices ?? []).toEqual([]);
    expect(server.vfiod.view.holdersOf(GPU)).toEqual([]);
  });

  test("the rollback leaves a device that was attached before the call", async () => {
    await server.client.attach({ vm: "ch-vm", pci: GPU, id: "gpu0" });
    ch.inject("vm.add-device", { kind: "respond", status: 500, body: JSON.stringify(["Error from API", "boom"]) });
    const err = await failure(server.client.attach({ vm: "ch-vm", pci: GPU, id: "gpu0", wholeGroup: true }));
    expect(err.message).toContain("rolled back: nothing had been attached by this call");
    expect(sent("vm.remove-device")).toEqual([]);
    expect((await server.client.list({ vm: "ch-vm" })).devices.map((d) => d.id)).toEqual(["gpu0"]);
  });

  test("a device alone in its group attaches alone, with no companions", async () => {
    const { companions } = await server.client.attach({ vm: "ch-vm", pci: LONE, id: "nic0", wholeGroup: true });
    expect(companions).toEqual([]);
    expect(sent("vm.add-device")).toHaveLength(1);
  });
});

describe("QEMU", () => {
  test("the device and its companion on two free root ports, in order; Detach with whole_group removes both", async () => {
    const { device, companions } = await server.client.attach({ vm: "q-vm", pci: GPU, id: "gpu0", wholeGroup: true });
    expect({ id: device?.id, bdf: device?.bdf }).toEqual({ id: "gpu0", bdf: GPU });
    expect(companions.map((c) => c.id)).toEqual(["gpu0-01-00-1"]);
    expect(qmp.commands("device_add").map((c) => [c.arguments?.id, c.arguments?.bus])).toEqual([
      ["gpu0", "rp1"],
      ["gpu0-01-00-1", "rp2"],
    ]);
    await server.client.detach({ vm: "q-vm", id: "gpu0", wholeGroup: true });
    expect(qmp.commands("device_del").map((c) => c.arguments?.id)).toEqual(["gpu0-01-00-1", "gpu0"]);
    expect((await server.client.list({ vm: "q-vm" })).devices).toEqual([]);
  });
});
