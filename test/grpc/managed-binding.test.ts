// Managed binding over real gRPC, against the Cloud Hypervisor double, on a fake
// sysfs tree whose kernel part ../support/fake-kernel.ts plays: every sysfs write
// vfiod makes is recorded, in order. Bind as libvirt does (driver_override,
// unbind, drivers_probe), restore the same way, the state file written first,
// variant drivers from modules.alias, rollback when the attach fails, a pending
// removal restored once the guest ejects, and a whole group bound together.
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { status } from "@grpc/grpc-js";
import { DeviceAllowList } from "../../src/host/device-allow-list";
import type { DeviceChange } from "../../src/view/device-view";
import { ChDouble } from "../support/ch-double";
import { FakeKernel, RecordingWriter } from "../support/fake-kernel";
import { addInterface } from "../support/fake-host";
import { buildFakeSysfs, type FakeFunction, type FakeSysfs } from "../support/fake-sysfs";
import { capturingLogger } from "../support/log-capture";
import { failure, startTestServer, type TestServer } from "../support/test-server";
import { waitFor } from "../support/wait";

const NIC = "0000:02:00.0";
const GPU = "0000:01:00.0";
const AUDIO = "0000:01:00.1";
const BRIDGE = "0000:00:1c.0";
const MLX = "0000:03:00.0";
const UNBOUND = "0000:04:00.0";
const VFIO = "0000:05:00.0";
const OUTSIDE = "0000:06:00.0";
const PLAIN_MLX = "0000:07:00.0";
const RELEASE = "6.8.0-vfiod-test";

const FUNCTIONS: FakeFunction[] = [
  { bdf: NIC, driver: "e1000e", group: 20, vendor: "0x8086", device: "0x10d3", pciClass: "0x020000" },
  { bdf: BRIDGE, driver: "pcieport", group: 12, pciClass: "0x060400" },
  { bdf: GPU, driver: "nouveau", group: 12 },
  { bdf: AUDIO, driver: "snd_hda_intel", group: 12, pciClass: "0x040300" },
  { bdf: MLX, driver: "mlx5_core", group: 30, vendor: "0x15b3", device: "0x101e", pciClass: "0x020000" },
  { bdf: UNBOUND, group: 40, vendor: "0x1b36", device: "0x0010", pciClass: "0x010802" },
  { bdf: VFIO, driver: "vfio-pci", group: 50 },
  { bdf: OUTSIDE, driver: "e1000e", group: 60, vendor: "0x8086", device: "0x10d3", pciClass: "0x020000" },
  { bdf: PLAIN_MLX, driver: "mlx5_core", group: 70, vendor: "0x15b3", device: "0x1017", pciClass: "0x020000" },
];
const ALLOWED = [NIC, GPU, AUDIO, MLX, UNBOUND, VFIO, PLAIN_MLX].join(",");

let dir: string;
let stateDir: string;
let sysfs: FakeSysfs;
let kernel: FakeKernel;
let writer: RecordingWriter;
let ch: ChDouble;
let slow: ChDouble;
let server: TestServer;
let changes: DeviceChange[];

const dev = (bdf: string) => `/sys/bus/pci/devices/${bdf}`;
/** libvirt's bind: driver_override, unbind from the current driver, drivers_probe. */
const bindWrites = (bdf: string, driver = "vfio-pci") => [
  { file: `${dev(bdf)}/driver_override`, value: driver },
  { file: `${dev(bdf)}/driver/unbind`, value: bdf },
  { file: "/sys/bus/pci/drivers_probe", value: bdf },
];
/** libvirt's restore: driver_override cleared, unbind from vfio-pci, drivers_probe. */
const restoreWrites = (bdf: string) => [
  { file: `${dev(bdf)}/driver_override`, value: "\n" },
  { file: `${dev(bdf)}/driver/unbind`, value: bdf },
  { file: "/sys/bus/pci/drivers_probe", value: bdf },
];
const stateFiles = () => fs.readdirSync(stateDir).sort();
const stateOf = (bdf: string) => JSON.parse(fs.readFileSync(path.join(stateDir, `${bdf}.json`), "utf8")) as Record<string, unknown>;
const adds = (double: ChDouble) => double.requests.filter((r) => r.endpoint === "vm.add-device");
const drivers = (kinds: string[]) =>
  changes.filter((c) => kinds.includes(c.kind)).map((c) => ({ kind: c.kind, bdf: c.device.bdf, detail: c.detail }));

/** A writer that also notes, at each write, which state files exist (the record must come first). */
class StateCheckingWriter extends RecordingWriter {
  readonly stateAtWrite: string[][] = [];
  override async write(file: string, value: string): Promise<void> {
    this.stateAtWrite.push(fs.existsSync(stateDir) ? fs.readdirSync(stateDir).sort() : []);
    await super.write(file, value);
  }
}

async function startServer(
  options: { loaded?: string[]; log?: ReturnType<typeof capturingLogger>["log"]; refreshIntervalMs?: number } = {},
): Promise<void> {
  kernel = new FakeKernel(sysfs, FUNCTIONS, { loaded: options.loaded ?? ["vfio-pci", "mlx5_vfio_pci"] });
  writer = new StateCheckingWriter(kernel);
  const inventoryFile = path.join(dir, "inventory.json");
  fs.writeFileSync(
    inventoryFile,
    JSON.stringify({
      vms: [
        { name: "ch-vm", hypervisor: "cloud-hypervisor", socket: ch.socketPath },
        { name: "slow-vm", hypervisor: "cloud-hypervisor", socket: slow.socketPath },
      ],
    }),
  );
  server = await startTestServer({
    inventoryFile,
    sysfsRoot: sysfs.root,
    kernelRelease: RELEASE,
    detachTimeoutMs: 500,
    allowList: DeviceAllowList.parse(ALLOWED, sysfs.root),
    binding: { stateDir, writer, pollMs: 50 },
    log: options.log,
    refreshIntervalMs: options.refreshIntervalMs,
  });
  changes = [];
  server.vfiod.view.subscribe((change) => changes.push(change));
}

beforeEach(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "vfiod-managed-"));
  stateDir = path.join(dir, "state");
  sysfs = buildFakeSysfs(FUNCTIONS, { groupNodes: "vfio-bound" });
  addInterface(sysfs, NIC, "enp2s0", false);
  // modules.alias of the fake kernel: a variant for 15b3:101e exactly, a vaguer one for any 15b3
  // device, and one for 15b3:1017 whose module is not loaded.
  const modules = path.join(sysfs.root, "lib/modules", RELEASE);
  fs.mkdirSync(modules, { recursive: true });
  fs.writeFileSync(
    path.join(modules, "modules.alias"),
    [
      "# Aliases extracted from modules themselves.",
      "alias pci:v00008086d000010D3sv*sd*bc*sc*i* e1000e",
      "alias vfio_pci:v000015B3d*sv*sd*bc*sc*i* vague_vfio_pci",
      "alias vfio_pci:v000015B3d0000101Esv*sd*bc*sc*i* mlx5_vfio_pci",
      "alias vfio_pci:v000015B3d00001017sv*sd*bc02sc*i* absent_vfio_pci",
      "alias vfio_pci:v000015B3d00001017sv*sd*bc*sc*i* vague_vfio_pci",
      "",
    ].join("\n"),
  );
  fs.mkdirSync(path.join(sysfs.root, "sys/module/mlx5_vfio_pci/drivers/pci:mlx5_vfio_pci"), { recursive: true });
  fs.mkdirSync(path.join(sysfs.root, "sys/module/vague_vfio_pci/drivers/pci:vague_vfio_pci"), { recursive: true });
  ch = await ChDouble.start(path.join(dir, "ch.sock"), { sysfsRoot: sysfs.root, ejectAfterMs: 5 });
  ch.setState("Running");
  slow = await ChDouble.start(path.join(dir, "slow.sock"), { sysfsRoot: sysfs.root });
  slow.setState("Running");
});

afterEach(async () => {
  await server.stop();
  await ch.close();
  await slow.close();
  sysfs.cleanup();
  fs.rmSync(dir, { recursive: true, force: true });
});

test("managed Attach records the driver, then binds as libvirt does; Detach gives e1000e back the same way and forgets it", async () => {
  await startServer();
  const { device } = await server.client.attach({ vm: "ch-vm", pci: NIC, id: "nic0", managed: true });
  expect(device).toMatchObject({ id: "nic0", bdf: NIC });
  expect(writer.writes).toEqual(bindWrites(NIC));
  // The record was on disk before the first write.
  expect((writer as StateCheckingWriter).stateAtWrite[0]).toEqual([`${NIC}.json`]);
  expect(stateOf(NIC)).toMatchObject({ bdf: NIC, driver: "e1000e", boundTo: "vfio-pci", id: "nic0", phase: "attached", vm: { name: "ch-vm" } });
  expect(kernel.driverOf(NIC)).toBe("vfio-pci");
  expect(adds(ch).map((r) => r.body)).toEqual([{ id: "nic0", path: dev(NIC) }]);
  expect(fs.existsSync(path.join(sysfs.deviceDir(NIC), "net/enp2s0"))).toBe(false);

  writer.writes.length = 0;
  await server.client.detach({ vm: "ch-vm", id: "nic0" });
  expect(writer.writes).toEqual(restoreWrites(NIC));
  expect(kernel.driverOf(NIC)).toBe("e1000e");
  expect(kernel.override(NIC)).toBeUndefined();
  // e1000e's interface is back, the group node gone, the record forgotten.
  expect(fs.existsSync(path.join(sysfs.deviceDir(NIC), "net/enp2s0"))).toBe(true);
  expect(fs.existsSync(path.join(sysfs.root, "dev/vfio/20"))).toBe(false);
  expect(stateFiles()).toEqual([]);
  expect(drivers(["driver_bound", "driver_restored"])).toEqual([
    { kind: "driver_bound", bdf: NIC, detail: "e1000e -> vfio-pci" },
    { kind: "driver_restored", bdf: NIC, detail: "vfio-pci -> e1000e" },
  ]);
});

test("the vfio-pci variant driver named for the device in modules.alias wins, the one with the fewest wildcards", async () => {
  await startServer();
  await server.client.attach({ vm: "ch-vm", pci: MLX, id: "vf0", managed: true });
  expect(writer.writes).toEqual(bindWrites(MLX, "mlx5_vfio_pci"));
  expect(kernel.driverOf(MLX)).toBe("mlx5_vfio_pci");
  expect(stateOf(MLX)).toMatchObject({ driver: "mlx5_core", boundTo: "mlx5_vfio_pci" });
  writer.writes.length = 0;
  await server.client.detach({ vm: "ch-vm", id: "vf0" });
  expect(writer.writes).toEqual(restoreWrites(MLX));
  expect(kernel.driverOf(MLX)).toBe("mlx5_core");
  expect(drivers(["driver_bound", "driver_restored"]).map((d) => d.detail)).toEqual([
    "mlx5_core -> mlx5_vfio_pci",
    "mlx5_vfio_pci -> mlx5_core",
  ]);
});

test("a variant named for the device but not loaded is skipped for vfio-pci (a looser variant is not taken instead), and said so", async () => {
  await startServer();
  await server.client.attach({ vm: "ch-vm", pci: PLAIN_MLX, id: "vf1", managed: true });
  expect(writer.writes).toEqual(bindWrites(PLAIN_MLX, "vfio-pci"));
  const [bound] = drivers(["driver_bound"]);
  expect(bound?.detail).toBe("mlx5_core -> vfio-pci (variant driver absent_vfio_pci is named for it but not loaded (modprobe absent_vfio_pci to use it))");
});

test("a failed attach (add-device 500) puts the driver back and says so; the record is forgotten", async () => {
  await startServer();
  ch.inject("vm.add-device", {
    kind: "respond",
    status: 500,
    body: JSON.stringify(["Error from API", "The device could not be added to the VM", "Error from device manager"]),
  });
  const refused = await failure(server.client.attach({ vm: "ch-vm", pci: NIC, id: "nic0", managed: true }));
  expect(refused).toMatchObject({ code: status.INTERNAL, reason: "HYPERVISOR_ERROR" });
  expect(refused.message).toContain(`host drivers: ${NIC} vfio-pci -> e1000e`);
  expect(writer.writes).toEqual([...bindWrites(NIC), ...restoreWrites(NIC)]);
  expect(kernel.driverOf(NIC)).toBe("e1000e");
  expect(stateFiles()).toEqual([]);
  expect(drivers(["driver_bound", "driver_restored"]).map((d) => d.kind)).toEqual(["driver_bound", "driver_restored"]);
});

test("a sysfs write the kernel refuses mid-bind puts back what was changed: the device goes back to e1000e", async () => {
  await startServer();
  writer.fail("/sys/bus/pci/drivers_probe", "EIO");
  const refused = await failure(server.client.attach({ vm: "ch-vm", pci: NIC, id: "nic0", managed: true }));
  expect(refused).toMatchObject({ code: status.FAILED_PRECONDITION, reason: "DEVICE_NOT_VFIO" });
  expect(refused.message).toMatch(/managed binding of host PCI device 0000:02:00\.0 to vfio-pci failed: writing "0000:02:00\.0" to \/sys\/bus\/pci\/drivers_probe failed for 0000:02:00\.0: EIO; put back: 0000:02:00\.0 no driver -> e1000e$/);
  // The unbind had happened: the restore clears the override and probes (nothing to unbind).
  expect(writer.writes).toEqual([
    ...bindWrites(NIC),
    { file: `${dev(NIC)}/driver_override`, value: "\n" },
    { file: "/sys/bus/pci/drivers_probe", value: NIC },
  ]);
  expect(kernel.driverOf(NIC)).toBe("e1000e");
  expect(adds(ch)).toEqual([]);
  expect(stateFiles()).toEqual([]);
});

test("a pending removal keeps vfio-pci, says the driver comes back once released, and gives it back when the guest ejects", async () => {
  await startServer();
  await server.client.attach({ vm: "slow-vm", pci: NIC, id: "nic0", managed: true });
  writer.writes.length = 0;
  const pending = await failure(server.client.detach({ vm: "slow-vm", id: "nic0" }));
  expect(pending).toMatchObject({ code: status.DEADLINE_EXCEEDED, reason: "DETACH_PENDING" });
  expect(pending.message).toContain(`host device ${NIC} stays on vfio-pci until the guest releases it, then it is given back to e1000e`);
  expect(kernel.driverOf(NIC)).toBe("vfio-pci");
  expect(stateOf(NIC)).toMatchObject({ phase: "releasing" });
  // The background look asks the VM several times: nothing is written while it holds the device.
  await new Promise((resolve) => setTimeout(resolve, 300));
  expect(writer.writes).toEqual([]);

  slow.guestEjects("nic0");
  await waitFor(() => drivers(["driver_restored"]).length > 0, "the driver restored after the eject", 5000);
  expect(kernel.driverOf(NIC)).toBe("e1000e");
  expect(writer.writes).toEqual(restoreWrites(NIC));
  expect(stateFiles()).toEqual([]);
  expect(drivers(["driver_restored"])).toEqual([{ kind: "driver_restored", bdf: NIC, detail: "vfio-pci -> e1000e" }]);
});

test("whole_group + managed binds every endpoint of the group (the bridge left alone), and whole_group Detach restores both", async () => {
  await startServer();
  const { device, companions } = await server.client.attach({ vm: "ch-vm", pci: GPU, id: "gpu0", wholeGroup: true, managed: true });
  expect(device?.bdf).toBe(GPU);
  expect(companions.map((c) => c.id)).toEqual(["gpu0-01-00-1"]);
  expect(writer.writes).toEqual([...bindWrites(GPU), ...bindWrites(AUDIO)]);
  expect([kernel.driverOf(GPU), kernel.driverOf(AUDIO), kernel.driverOf(BRIDGE)]).toEqual(["vfio-pci", "vfio-pci", "pcieport"]);
  expect(stateOf(AUDIO)).toMatchObject({ driver: "snd_hda_intel", id: "gpu0-01-00-1", phase: "attached" });

  writer.writes.length = 0;
  await server.client.detach({ vm: "ch-vm", id: "gpu0", wholeGroup: true });
  expect(writer.writes).toEqual([...restoreWrites(AUDIO), ...restoreWrites(GPU)]);
  expect([kernel.driverOf(GPU), kernel.driverOf(AUDIO)]).toEqual(["nouveau", "snd_hda_intel"]);
  expect(stateFiles()).toEqual([]);
});

test("whole_group + managed whose companion fails to attach removes the device again and puts both drivers back", async () => {
  await startServer();
  // The GPU goes in; the audio function's add-device fails.
  ch.inject("vm.add-device", { kind: "delay", ms: 0 });
  ch.inject("vm.add-device", { kind: "respond", status: 500, body: JSON.stringify(["Error from API", "no"]) });
  const refused = await failure(server.client.attach({ vm: "ch-vm", pci: GPU, id: "gpu0", wholeGroup: true, managed: true }));
  expect(refused.reason).toBe("HYPERVISOR_ERROR");
  expect(refused.message).toContain("rolled back: gpu0 (0000:01:00.0) removed again");
  expect(refused.message).toContain(`host drivers: ${GPU} vfio-pci -> nouveau; ${AUDIO} vfio-pci -> snd_hda_intel`);
  expect([kernel.driverOf(GPU), kernel.driverOf(AUDIO)]).toEqual(["nouveau", "snd_hda_intel"]);
  expect(stateFiles()).toEqual([]);
});

test("managed without whole_group, a group mate on a host driver: IOMMU_GROUP_NOT_VIABLE before anything is written", async () => {
  await startServer();
  const refused = await failure(server.client.attach({ vm: "ch-vm", pci: GPU, id: "gpu0", managed: true }));
  expect(refused).toMatchObject({ code: status.FAILED_PRECONDITION, reason: "IOMMU_GROUP_NOT_VIABLE" });
  expect(refused.message).toContain(`${AUDIO} (driver snd_hda_intel)`);
  expect(refused.message).toContain("attach with managed and whole_group");
  expect(writer.writes).toEqual([]);
  expect(stateFiles()).toEqual([]);
});

test("a device already on vfio-pci: nothing written on Attach, nothing to restore on Detach", async () => {
  await startServer();
  await server.client.attach({ vm: "ch-vm", pci: VFIO, id: "v0", managed: true });
  await server.client.detach({ vm: "ch-vm", id: "v0" });
  expect(writer.writes).toEqual([]);
  expect(kernel.driverOf(VFIO)).toBe("vfio-pci");
  expect(stateFiles()).toEqual([]);
});

test("a device on no driver is bound without an unbind, and left unbound afterwards", async () => {
  await startServer();
  await server.client.attach({ vm: "ch-vm", pci: UNBOUND, id: "u0", managed: true });
  expect(writer.writes).toEqual([
    { file: `${dev(UNBOUND)}/driver_override`, value: "vfio-pci" },
    { file: "/sys/bus/pci/drivers_probe", value: UNBOUND },
  ]);
  expect(stateOf(UNBOUND)).toMatchObject({ driver: null });
  writer.writes.length = 0;
  await server.client.detach({ vm: "ch-vm", id: "u0" });
  expect(writer.writes).toEqual([
    { file: `${dev(UNBOUND)}/driver_override`, value: "\n" },
    { file: `${dev(UNBOUND)}/driver/unbind`, value: UNBOUND },
  ]);
  expect(kernel.driverOf(UNBOUND)).toBeUndefined();
  expect(drivers(["driver_restored"]).map((d) => d.detail)).toEqual(["vfio-pci -> no driver"]);
});

test("a retried managed Attach (same id, same device) answers the attached device and writes nothing more", async () => {
  await startServer();
  await server.client.attach({ vm: "ch-vm", pci: NIC, id: "nic0", managed: true });
  const again = await server.client.attach({ vm: "ch-vm", pci: NIC, id: "nic0", managed: true });
  expect(again.device).toMatchObject({ id: "nic0", bdf: NIC });
  expect(writer.writes).toEqual(bindWrites(NIC));
  expect(adds(ch)).toHaveLength(1);
  expect(stateOf(NIC)).toMatchObject({ driver: "e1000e", phase: "attached" });
  await server.client.detach({ vm: "ch-vm", id: "nic0" });
  expect(kernel.driverOf(NIC)).toBe("e1000e");
});

test("a device outside --allow-devices is refused before anything is written", async () => {
  await startServer();
  const refused = await failure(server.client.attach({ vm: "ch-vm", pci: OUTSIDE, id: "x", managed: true }));
  expect(refused).toMatchObject({ code: status.PERMISSION_DENIED, reason: "DEVICE_NOT_ALLOWED" });
  expect(writer.writes).toEqual([]);
  expect(stateFiles()).toEqual([]);
  expect(kernel.driverOf(OUTSIDE)).toBe("e1000e");
});

test("vfio-pci not loaded: refused before anything is written, saying modprobe vfio-pci", async () => {
  fs.rmSync(path.join(sysfs.root, "sys/bus/pci/drivers/vfio-pci"), { recursive: true, force: true });
  await startServer({ loaded: [] });
  const refused = await failure(server.client.attach({ vm: "ch-vm", pci: NIC, id: "nic0", managed: true }));
  expect(refused).toMatchObject({ code: status.FAILED_PRECONDITION, reason: "DEVICE_NOT_VFIO" });
  expect(refused.message).toContain("modprobe vfio-pci");
  expect(writer.writes).toEqual([]);
  expect(stateFiles()).toEqual([]);
});

test("without --manage-binding, managed is BINDING_DISABLED: nothing written, the hypervisor not asked", async () => {
  await startServer();
  const plain = await startTestServer({
    inventoryFile: path.join(dir, "inventory.json"),
    sysfsRoot: sysfs.root,
    allowList: DeviceAllowList.parse(ALLOWED, sysfs.root),
  });
  try {
    const refused = await failure(plain.client.attach({ vm: "ch-vm", pci: NIC, id: "nic0", managed: true }));
    expect(refused).toMatchObject({ code: status.FAILED_PRECONDITION, reason: "BINDING_DISABLED" });
    expect(refused.message).toContain("--manage-binding");
    // Without managed, the same vfiod refuses the e1000e device as it always did.
    expect((await failure(plain.client.attach({ vm: "ch-vm", pci: NIC, id: "nic0" }))).reason).toBe("DEVICE_NOT_VFIO");
  } finally {
    await plain.stop();
  }
  expect(kernel.driverOf(NIC)).toBe("e1000e");
  expect(kernel.override(NIC)).toBeUndefined();
  expect(adds(ch)).toEqual([]);
  expect(fs.existsSync(stateDir) ? stateFiles() : []).toEqual([]);
});

test("a record that cannot be written to --state-dir refuses the attach before sysfs is touched", async () => {
  await startServer();
  fs.rmSync(stateDir, { recursive: true });
  fs.writeFileSync(stateDir, "not a directory");
  const refused = await failure(server.client.attach({ vm: "ch-vm", pci: NIC, id: "nic0", managed: true }));
  expect(refused).toMatchObject({ code: status.FAILED_PRECONDITION, reason: "DEVICE_NOT_VFIO" });
  expect(refused.message).toContain(`cannot record it in --state-dir ${stateDir}`);
  expect(refused.message).toContain("put back: nothing had changed");
  expect(writer.writes).toEqual([]);
  expect(kernel.driverOf(NIC)).toBe("e1000e");
  fs.rmSync(stateDir);
  fs.mkdirSync(stateDir);
});

test("two managed Attaches of one device to two VMs at once: one wins, the other is DEVICE_IN_USE, the device bound once", async () => {
  await startServer();
  const results = await Promise.allSettled([
    server.client.attach({ vm: "ch-vm", pci: NIC, id: "a", managed: true }),
    server.client.attach({ vm: "slow-vm", pci: NIC, id: "b", managed: true }),
  ]);
  expect(results.filter((r) => r.status === "fulfilled")).toHaveLength(1);
  const [lost] = results.filter((r): r is PromiseRejectedResult => r.status === "rejected");
  expect((await failure(Promise.reject(lost?.reason))).reason).toBe("DEVICE_IN_USE");
  expect(writer.writes).toEqual(bindWrites(NIC));
  expect(stateOf(NIC)).toMatchObject({ phase: "attached" });
});

test("a managed device seen leaving its VM some other way (the background refresh) gets its driver back", async () => {
  await startServer({ refreshIntervalMs: 100 });
  await server.client.attach({ vm: "ch-vm", pci: NIC, id: "nic0", managed: true });
  writer.writes.length = 0;
  // Someone else removes it (here another vfiod, without --manage-binding).
  const other = await startTestServer({ inventoryFile: path.join(dir, "inventory.json"), sysfsRoot: sysfs.root });
  try {
    await other.client.detach({ vm: "ch-vm", id: "nic0" });
  } finally {
    await other.stop();
  }
  await waitFor(() => drivers(["driver_restored"]).length === 1, "the driver restored after the refresh saw the device go", 5000);
  expect(writer.writes).toEqual(restoreWrites(NIC));
  expect(kernel.driverOf(NIC)).toBe("e1000e");
  expect(stateFiles()).toEqual([]);
});

describe("a restart with records in --state-dir", () => {
  test("attached before the restart, let go while vfiod was down: restored once the VM says it no longer holds it", async () => {
    await startServer();
    await server.client.attach({ vm: "ch-vm", pci: NIC, id: "nic0", managed: true });
    await server.stop();
    // Another vfiod, without --manage-binding, detaches it: the VM lets go, no one restores the driver.
    const plain = await startTestServer({ inventoryFile: path.join(dir, "inventory.json"), sysfsRoot: sysfs.root });
    await plain.client.detach({ vm: "ch-vm", id: "nic0" });
    await plain.stop();
    expect(kernel.driverOf(NIC)).toBe("vfio-pci");

    const { log, lines } = capturingLogger("info");
    await startServer({ log });
    expect(lines.find((l) => l.msg.startsWith("managed binding: repair"))).toMatchObject({
      device: NIC,
      phase: "attached",
      msg: "managed binding: repair: attached before the restart and held by no process; restored once its VM says it let go",
    });
    await waitFor(() => kernel.driverOf(NIC) === "e1000e" && stateFiles().length === 0, "e1000e restored by the background look", 5000);
    expect(writer.writes).toEqual(restoreWrites(NIC));
  });

  test("attached before the restart and still attached: kept (the VM says it holds it), restored by its Detach", async () => {
    await startServer();
    await server.client.attach({ vm: "ch-vm", pci: NIC, id: "nic0", managed: true });
    await server.stop();
    await startServer();
    // Several background looks: the VM still holds it.
    await new Promise((resolve) => setTimeout(resolve, 300));
    expect(writer.writes).toEqual([]);
    expect(kernel.driverOf(NIC)).toBe("vfio-pci");
    await server.client.detach({ vm: "ch-vm", id: "nic0" });
    expect(writer.writes).toEqual(restoreWrites(NIC));
    expect(kernel.driverOf(NIC)).toBe("e1000e");
  });

  test("a file that is no state record is left alone and reported; a device gone from the host is forgotten; a torn write's temporary file removed", async () => {
    fs.mkdirSync(stateDir, { recursive: true });
    fs.writeFileSync(path.join(stateDir, "0000:04:00.0.json.999.tmp"), '{"version":1,"bdf":"0000:04');
    fs.writeFileSync(path.join(stateDir, "notes.txt"), "keep me");
    fs.writeFileSync(path.join(stateDir, "0000:02:00.0.json"), "{ torn");
    const gone = { version: 1, bdf: "0000:09:00.0", driver: "ixgbe", boundTo: "vfio-pci", vm: { id: "x", name: "x", source: "inventory", hypervisor: "qemu", socket: "/x" }, id: "d", phase: "binding", since: "" };
    fs.writeFileSync(path.join(stateDir, "0000:09:00.0.json"), JSON.stringify(gone));
    const { log, lines } = capturingLogger("info");
    await startServer({ log });
    expect(stateFiles()).toEqual(["0000:02:00.0.json", "notes.txt"]);
    expect(lines.filter((l) => l.msg === "managed binding: a file in --state-dir is not a state record; left alone").map((l) => path.basename(String(l.file)))).toEqual([
      "0000:02:00.0.json",
      "notes.txt",
    ]);
    expect(lines.find((l) => l.msg === "managed binding: a recorded device is gone from the host; record forgotten")).toMatchObject({ device: "0000:09:00.0" });
    expect(writer.writes).toEqual([]);
  });
});
