// InventoryService over real gRPC: ListVms across both inventory sources and every
// hypervisor (a hung one and an unreachable one included), and ListHostDevices on a
// fake sysfs tree with real processes holding fake group nodes open.
import { spawn, type ChildProcess } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { ChDouble } from "../support/ch-double";
import { buildFakeSysfs, type FakeSysfs } from "../support/fake-sysfs";
import { FcDouble } from "../support/fc-double";
import { QmpDouble } from "../support/qmp-double";
import { VmmProcess } from "../support/vmm-process";
import { startTestServer, type TestServer } from "../support/test-server";
import { waitFor } from "../support/wait";

let dir: string;
let sysfs: FakeSysfs;
let server: TestServer;
const chs = new Map<string, ChDouble>();
let qmp: QmpDouble;
let fc: FcDouble;
let holder: ChildProcess | undefined;

const COCOON_ID = "K7Q2MZ4XW3ABCDEFGHJ2345677";
const STOPPED_ID = "K7QAAAAAAAAAAAAAAAAAAAAAAA";
let cocoonVmm: VmmProcess;

/**
 * cocoon's records: one running CH VM, one stopped. The running VM's pid file names
 * a real process (a stand-in whose command line names the API socket, whose
 * binary is bash: cocoon's --cocoon-ch-binary is set to match).
 */
function cocoonRoot(socketOf: (runDir: string) => string): { root: string; socket: string } {
  const root = path.join(dir, "cocoon");
  const runDir = path.join(dir, "run", COCOON_ID);
  fs.mkdirSync(path.join(root, "cloudhypervisor", "db"), { recursive: true });
  fs.mkdirSync(runDir, { recursive: true });
  const records = {
    [COCOON_ID]: { id: COCOON_ID, state: "running", config: { name: "cocoon-vm" }, run_dir: runDir },
    [STOPPED_ID]: { id: STOPPED_ID, state: "stopped", config: { name: "idle-vm" }, run_dir: path.join(dir, "run", STOPPED_ID) },
  };
  fs.writeFileSync(
    path.join(root, "cloudhypervisor", "db", "vms.json"),
    JSON.stringify({ vms: records, names: { "cocoon-vm": COCOON_ID, "idle-vm": STOPPED_ID } }),
  );
  const socket = socketOf(runDir);
  cocoonVmm = VmmProcess.spawn("cloud-hypervisor", ["--api-socket", `path=${socket}`]);
  fs.writeFileSync(path.join(runDir, "ch.pid"), `${cocoonVmm.pid}\n`);
  return { root, socket };
}

beforeAll(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "vfiod-inv-"));
  sysfs = buildFakeSysfs([
    { bdf: "0000:00:01.0", driver: "pcieport", group: 1, pciClass: "0x060400", vendor: "0x8086", device: "0x1901" },
    { bdf: "0000:01:00.0", driver: "vfio-pci", group: 12, vendor: "0x10de", device: "0x2204" },
    { bdf: "0000:01:00.1", driver: "vfio-pci", group: 12, pciClass: "0x040300", vendor: "0x10de", device: "0x1aef" },
    { bdf: "0000:02:00.0", driver: "nvme", group: 13, pciClass: "0x010802", vendor: "0x144d", device: "0xa808" },
    { bdf: "0000:03:00.0", driver: "vfio-pci", group: 14, pciClass: "0x020000" },
    { bdf: "0000:03:00.1", driver: "ixgbe", group: 14, pciClass: "0x020000" },
    { bdf: "0000:04:00.0", driver: "vfio-pci", pciClass: "0x020000" },
    { bdf: "0000:05:00.0", driver: "vfio-pci", group: 15, pciClass: "0x020000" },
    { bdf: "0000:06:00.0", driver: "vfio-pci", group: 16, pciClass: "0x020000" },
  ]);
  fs.writeFileSync(path.join(sysfs.root, "sys/bus/pci/devices/0000:01:00.0/numa_node"), "1\n");
  const cocoon = cocoonRoot((runDir) => path.join(runDir, "api.sock"));
  for (const [name, state] of [["running", "Running"], ["paused", "Paused"], ["hung", "Running"]] as const) {
    const double = await ChDouble.start(path.join(dir, `${name}.sock`), { sysfsRoot: sysfs.root, ejectAfterMs: 1 });
    double.setState(state);
    chs.set(name, double);
  }
  const cocoonCh = await ChDouble.start(cocoon.socket, { sysfsRoot: sysfs.root });
  cocoonCh.setState("Running");
  chs.set("cocoon", cocoonCh);
  chs.get("hung")!.inject("vm.info", { kind: "hang" });
  const noVm = await ChDouble.start(path.join(dir, "no-vm.sock"));
  chs.set("no-vm", noVm);
  qmp = await QmpDouble.start({ status: "paused" });
  fc = await FcDouble.start(path.join(dir, "fc.sock"));
  const vms = [
    ...["running", "paused", "hung", "no-vm"].map((name) => ({ name, hypervisor: "cloud-hypervisor", socket: chs.get(name)!.socketPath })),
    { name: "gone", hypervisor: "cloud-hypervisor", socket: path.join(dir, "gone.sock") },
    { name: "q", hypervisor: "qemu", socket: qmp.socket },
    { name: "fc", hypervisor: "firecracker", socket: fc.socketPath },
  ];
  const inventoryFile = path.join(dir, "inventory.json");
  fs.writeFileSync(inventoryFile, JSON.stringify({ vms }));
  server = await startTestServer({
    inventoryFile,
    cocoonRoot: cocoon.root,
    // cocoon's ch_binary, so its liveness check accepts the stand-in (a bash).
    cocoonBinaries: { cloudHypervisor: "bash", firecracker: "firecracker" },
    sysfsRoot: sysfs.root,
  });
}, 30_000);

afterAll(async () => {
  holder?.kill("SIGKILL");
  cocoonVmm.stop();
  await server.stop();
  for (const double of chs.values()) await double.close();
  await qmp.close();
  await fc.close();
  sysfs.cleanup();
  fs.rmSync(dir, { recursive: true, force: true });
});

describe("ListVms", () => {
  test("every VM of both sources with its hypervisor's state; a hung VM is unknown after 1 s and holds nothing up", async () => {
    const started = performance.now();
    const { vms } = await server.inventory.listVms({}, { timeoutMs: 10_000 });
    const ms = performance.now() - started;
    const byName = Object.fromEntries(vms.map((vm) => [vm.name, vm]));
    expect(Object.keys(byName).sort()).toEqual(["cocoon-vm", "fc", "gone", "hung", "idle-vm", "no-vm", "paused", "q", "running"]);
    expect(byName.running).toMatchObject({ id: "running", hypervisor: "cloud-hypervisor", state: "Running", source: "inventory" });
    expect(byName.paused?.state).toBe("Paused");
    expect(byName.q).toMatchObject({ hypervisor: "qemu", state: "paused" });
    expect(byName.fc).toMatchObject({ hypervisor: "firecracker", state: "Running" });
    expect(byName["cocoon-vm"]).toMatchObject({ id: COCOON_ID, state: "Running", source: "cocoon" });
    expect(byName["idle-vm"]).toMatchObject({ id: STOPPED_ID, source: "cocoon", state: "not running: state is stopped" });
    expect(byName["no-vm"]?.state).toMatch(/^not running: .*VM is not created/);
    expect(byName.gone?.state).toMatch(/^unreachable: .*api socket does not exist/);
    expect(byName.hung?.state).toBe("unknown: no answer within 1 s");
    expect(ms).toBeLessThan(4000);
  });
});

describe("ListHostDevices", () => {
  const list = async (vfioOnly = false) => {
    const { devices } = await server.inventory.listHostDevices({ vfioOnly }, { timeoutMs: 10_000 });
    return Object.fromEntries(devices.map((d) => [d.bdf, d]));
  };

  test("endpoints only (the bridge is left out), with ids, class, driver, group, members and NUMA node", async () => {
    const devices = await list();
    expect(Object.keys(devices)).toEqual([
      "0000:01:00.0", "0000:01:00.1", "0000:02:00.0", "0000:03:00.0", "0000:03:00.1", "0000:04:00.0", "0000:05:00.0", "0000:06:00.0",
    ]);
    expect(devices["0000:01:00.0"]).toMatchObject({
      vendorId: "10de",
      deviceId: "2204",
      classCode: "030000",
      driver: "vfio-pci",
      iommuGroup: 12,
      groupMembers: ["0000:01:00.1"],
      numaNode: 1,
      ready: true,
      notReadyReason: "",
      heldByVm: "",
      heldByPid: 0,
    });
    expect(devices["0000:04:00.0"]).toMatchObject({ iommuGroup: -1, numaNode: -1, ready: false });
  });

  test("why a device is not ready: not on vfio-pci, group not viable, no IOMMU group", async () => {
    const devices = await list();
    expect(devices["0000:02:00.0"]).toMatchObject({ ready: false, driver: "nvme" });
    expect(devices["0000:02:00.0"]?.notReadyReason).toContain("is bound to nvme, not vfio-pci");
    expect(devices["0000:03:00.0"]?.notReadyReason).toContain("0000:03:00.1 (driver ixgbe)");
    expect(devices["0000:04:00.0"]?.notReadyReason).toContain("IOMMU off or not in a group");
  });

  test("vfio_only lists only devices on a VFIO driver", async () => {
    expect(Object.keys(await list(true))).toEqual(["0000:01:00.0", "0000:01:00.1", "0000:03:00.0", "0000:04:00.0", "0000:05:00.0", "0000:06:00.0"]);
  });

  test("held by a VM (its hypervisor holds the group open) and by an unknown process: not ready, naming the holder", async () => {
    await server.client.attach({ vm: "running", pci: "0000:05:00.0", id: "nic0" });
    const fd = fs.openSync(path.join(sysfs.root, "dev/vfio/16"), "r");
    holder = spawn("sleep", ["60"], { stdio: ["ignore", "ignore", "ignore", fd] });
    fs.closeSync(fd);
    await waitFor(async () => (await list())["0000:06:00.0"]?.heldByPid === holder!.pid, "the sleep is seen");
    const devices = await list();
    expect(devices["0000:05:00.0"]).toMatchObject({ ready: false, heldByVm: "running", heldByPid: chs.get("running")!.vmmPid });
    expect(devices["0000:05:00.0"]?.notReadyReason).toContain("attached to VM running");
    expect(devices["0000:06:00.0"]).toMatchObject({ ready: false, heldByVm: "", heldByPid: holder.pid });
    expect(devices["0000:06:00.0"]?.notReadyReason).toContain(`held open by process ${holder.pid} (sleep 60)`);
    await server.client.detach({ vm: "running", id: "nic0" });
    expect((await list())["0000:05:00.0"]).toMatchObject({ ready: true, heldByVm: "", heldByPid: 0 });
  });
});
