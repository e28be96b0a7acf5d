// "Is this device held elsewhere?" from the kernel's view (who has the device's
// VFIO group node open, in /proc/<pid>/fd) and from vfiod's own knowledge, over real
// gRPC. The fake sysfs tree's dev/vfio/<group> files stand in for the group nodes;
// real processes hold them open: a `sleep`, or a Cloud Hypervisor double's stand-in
// VMM process whose command line names its API socket.
import { execFileSync, spawn, type ChildProcess } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { CloudHypervisorSockets } from "../../src/backends/cloud-hypervisor/client";
import { createDeviceClient } from "../../src/grpc/client";
import { KERNEL_READ_WAIT_MS } from "../../src/host/kernel-reads";
import { ChDouble } from "../support/ch-double";
import { buildFakeSysfs, type FakeSysfs } from "../support/fake-sysfs";
import { skipOutsideCi } from "../support/skip";
import { failure, startTestServer, type TestServer } from "../support/test-server";
import { startVfiod } from "../support/vfiod-process";
import { waitFor } from "../support/wait";

const GPU = "0000:01:00.0";
const AUDIO = "0000:01:00.1";
const NIC = "0000:02:00.0";

let dir: string;
let sysfs: FakeSysfs;
const doubles = new Map<string, ChDouble>();
let inventoryFile: string;
let server: TestServer | undefined;
const children: ChildProcess[] = [];

const ch = (vm: string) => doubles.get(vm)!;
const adds = (vm: string) => ch(vm).requests.filter((r) => r.endpoint === "vm.add-device");

beforeEach(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "vfiod-held-"));
  sysfs = buildFakeSysfs([
    { bdf: GPU, driver: "vfio-pci", group: 12 },
    { bdf: AUDIO, driver: "vfio-pci", group: 12, pciClass: "0x040300" },
    { bdf: NIC, driver: "vfio-pci", group: 13 },
  ]);
  const vms = [];
  for (const [name, state] of [["vm-a", "Running"], ["vm-b", "Running"], ["vm-c", "Created"]] as const) {
    const double = await ChDouble.start(path.join(dir, `${name}.sock`), { sysfsRoot: sysfs.root });
    double.setState(state);
    doubles.set(name, double);
    vms.push({ name, hypervisor: "cloud-hypervisor", socket: double.socketPath });
  }
  inventoryFile = path.join(dir, "inventory.json");
  fs.writeFileSync(inventoryFile, JSON.stringify({ vms }));
});

afterEach(async () => {
  await server?.stop();
  server = undefined;
  for (const child of children.splice(0)) child.kill("SIGKILL");
  for (const double of doubles.values()) await double.close();
  doubles.clear();
  sysfs.cleanup();
  fs.rmSync(dir, { recursive: true, force: true });
});

async function serve(): Promise<TestServer> {
  server = await startTestServer({ inventoryFile, sysfsRoot: sysfs.root, detachTimeoutMs: 300 });
  return server;
}

/** Adds a device to a VM the way ch-remote would: behind vfiod's back. */
function addBehindVfiodsBack(vm: string, bdf: string, id: string): Promise<unknown> {
  return new CloudHypervisorSockets(5000).client(ch(vm).socketPath, vm).addDevice({ path: `/sys/bus/pci/devices/${bdf}`, id }, AbortSignal.timeout(5000));
}

/** A process that is no VM (a DPDK app, say) holding a group node open. */
async function holdOpen(file: string): Promise<ChildProcess> {
  const fd = fs.openSync(file, "r");
  const child = spawn("sleep", ["60"], { stdio: ["ignore", "ignore", "ignore", fd] });
  // Only the child holds it, not this test process.
  fs.closeSync(fd);
  children.push(child);
  await waitFor(() => fs.readdirSync(`/proc/${child.pid}/fd`).some((fd) => fs.readlinkSync(`/proc/${child.pid}/fd/${fd}`) === file), "sleep holds it");
  return child;
}

describe("the kernel's view", () => {
  test("a process that is no VM holding the device's group open: DEVICE_IN_USE naming its pid and command; no hypervisor asked", async () => {
    const holder = await holdOpen(path.join(sysfs.root, "dev/vfio/12"));
    const { client } = await serve();
    const err = await failure(client.attach({ vm: "vm-a", pci: GPU, id: "gpu0" }));
    expect({ code: err.code, reason: err.reason }).toEqual({ code: 9, reason: "DEVICE_IN_USE" });
    expect(err.message).toContain(`process ${holder.pid} (sleep 60)`);
    expect(err.message).toContain("no VM vfiod knows");
    expect(adds("vm-a")).toEqual([]);
    // Another device is not affected; once the process lets go, the device attaches.
    await client.attach({ vm: "vm-a", pci: NIC, id: "nic0" });
    holder.kill("SIGKILL");
    await waitFor(() => holder.exitCode !== null || holder.signalCode !== null, "the holder exits");
    await expect(client.attach({ vm: "vm-a", pci: GPU, id: "gpu0" })).resolves.toMatchObject({ device: { id: "gpu0" } });
  });

  test("a holder whose command line does not come (stuck in the kernel): DEVICE_IN_USE within the bound, saying why no VM is named", async () => {
    // A fake /proc: one process holding the group node, whose cmdline is a FIFO no one writes.
    const procRoot = path.join(dir, "proc");
    fs.mkdirSync(path.join(procRoot, "1", "fd"), { recursive: true });
    const holder = path.join(procRoot, "4242");
    fs.mkdirSync(path.join(holder, "fd"), { recursive: true });
    fs.symlinkSync(path.join(sysfs.root, "dev/vfio/12"), path.join(holder, "fd", "7"));
    fs.writeFileSync(path.join(holder, "comm"), "cloud-hyperviso\n");
    execFileSync("mkfifo", [path.join(holder, "cmdline")]);
    try {
      server = await startTestServer({ inventoryFile, sysfsRoot: sysfs.root, procRoot, detachTimeoutMs: 300 });
      const started = performance.now();
      const err = await failure(server.client.attach({ vm: "vm-a", pci: GPU, id: "gpu0" }));
      expect(performance.now() - started).toBeLessThan(KERNEL_READ_WAIT_MS + 2000);
      expect(err.reason).toBe("DEVICE_IN_USE");
      expect(err.message).toContain("process 4242 (cloud-hyperviso), whose command line vfiod cannot read now");
      expect(adds("vm-a")).toEqual([]);
    } finally {
      // A writer ends the read still blocked on the FIFO.
      fs.closeSync(fs.openSync(path.join(holder, "cmdline"), fs.constants.O_WRONLY | fs.constants.O_NONBLOCK));
    }
  });

  test("a VM's hypervisor holding the group (attached behind vfiod's back): DEVICE_IN_USE naming that VM; the other VM not asked", async () => {
    await addBehindVfiodsBack("vm-a", GPU, "gpu0");
    const { client } = await serve();
    const err = await failure(client.attach({ vm: "vm-b", pci: GPU, id: "gpu0" }));
    expect({ code: err.code, reason: err.reason }).toEqual({ code: 9, reason: "DEVICE_IN_USE" });
    expect(err.message).toContain(`VM vm-a (its hypervisor (pid ${ch("vm-a").vmmPid}) holds the IOMMU group open)`);
    expect(adds("vm-b")).toEqual([]);
  });

  test("another function of the same IOMMU group held by a VM: the whole group is taken, DEVICE_IN_USE naming the VM", async () => {
    const { client } = await serve();
    await client.attach({ vm: "vm-a", pci: GPU, id: "gpu0" });
    const err = await failure(client.attach({ vm: "vm-b", pci: AUDIO, id: "audio0" }));
    expect(err.reason).toBe("DEVICE_IN_USE");
    expect(err.message).toContain(`host PCI device ${GPU}, in the same IOMMU group as ${AUDIO}, is attached to VM vm-a (device id gpu0;`);
    expect(adds("vm-b")).toEqual([]);
    // The VM that holds the group may take its other function.
    await expect(client.attach({ vm: "vm-a", pci: AUDIO, id: "audio0" })).resolves.toMatchObject({ device: { id: "audio0" } });
  });

  test("a removal still pending when vfiod restarts keeps the device refused for other VMs until the guest releases it", async () => {
    const first = await serve();
    await first.client.attach({ vm: "vm-a", pci: GPU, id: "gpu0" });
    expect((await failure(first.client.detach({ vm: "vm-a", id: "gpu0" }))).reason).toBe("DETACH_PENDING");
    await first.stop();
    // A new vfiod knows nothing of that removal; CH's node no longer names the device.
    const { client } = await serve();
    const err = await failure(client.attach({ vm: "vm-b", pci: GPU, id: "gpu0" }));
    expect(err.reason).toBe("DEVICE_IN_USE");
    expect(err.message).toContain("VM vm-a");
    expect(adds("vm-b")).toEqual([]);
    ch("vm-a").guestEjects("gpu0");
    await waitFor(() => ch("vm-a").heldGroups().length === 0, "vm-a's CH closes the group");
    await expect(client.attach({ vm: "vm-b", pci: GPU, id: "gpu0" })).resolves.toMatchObject({ device: { id: "gpu0" } });
  });
});

describe("vfiod's knowledge", () => {
  test("a device configured in a created, not booted VM (not opened yet): refused from what vfiod last read, naming the VM", async () => {
    // CH takes it into the created VM's config only (204): no process holds the group yet.
    await addBehindVfiodsBack("vm-c", NIC, "nic0");
    expect(ch("vm-c").heldGroups()).toEqual([]);
    const { client } = await serve();
    // Before vfiod has read vm-c, the kernel shows nothing: the Attach would go through.
    // A List (or the background refresh) tells vfiod what vm-c holds.
    expect((await client.list({ vm: "vm-c" })).devices.map((d) => d.bdf)).toEqual([NIC]);
    const err = await failure(client.attach({ vm: "vm-b", pci: NIC, id: "nic0" }));
    expect(err.reason).toBe("DEVICE_IN_USE");
    expect(err.message).toMatch(/VM vm-c \(device id nic0, as vfiod last read the VM (just now|\d+ s ago)\)/);
    expect(adds("vm-b")).toEqual([]);
  });

  test("the background refresh learns it without any call about that VM", async () => {
    await addBehindVfiodsBack("vm-c", NIC, "nic0");
    server = await startTestServer({ inventoryFile, sysfsRoot: sysfs.root, refreshIntervalMs: 100 });
    await waitFor(() => server!.vfiod.view.holdersOf(NIC).length > 0, "refreshed");
    expect((await failure(server.client.attach({ vm: "vm-a", pci: NIC, id: "nic0" }))).reason).toBe("DEVICE_IN_USE");
  });
});

describe("without access to other processes' open files (not root)", () => {
  test("vfiod says so once at start; the hypervisor's EBUSY is still DEVICE_IN_USE", async () => {
    if (process.getuid?.() !== 0) {
      skipOutsideCi("the not-root test", "it needs root to start vfiod as another user");
      return;
    }
    // vfiod runs as nobody: it can read the fake sysfs tree and reach the doubles, not /proc/<pid>/fd of others.
    fs.chmodSync(dir, 0o755);
    fs.chmodSync(sysfs.root, 0o755);
    for (const double of doubles.values()) fs.chmodSync(double.socketPath, 0o777);
    const args = ["--inventory", inventoryFile, "--sysfs-root", sysfs.root, "--cocoon-root", path.join(dir, "none"), "--refresh-interval", "1h"];
    const vfiod = await startVfiod(args, {}, { as: { uid: 65534, gid: 65534 } });
    const client = createDeviceClient(vfiod.address);
    try {
      // After vfiod's first background read of vm-a, so it knows nothing of this device.
      await waitFor(() => ch("vm-a").requests.some((r) => r.endpoint === "vm.info"), "vfiod's first refresh");
      await addBehindVfiodsBack("vm-a", GPU, "gpu0");
      const err = await failure(client.attach({ vm: "vm-b", pci: GPU, id: "gpu0" }));
      // vfiod could not see vm-a's process: vm-b's CH tried, and the kernel refused (EBUSY).
      expect(err.reason).toBe("DEVICE_IN_USE");
      expect(err.message).toContain("Device or resource busy");
      expect(adds("vm-b")).toHaveLength(1);
      const warned = vfiod.logs.filter((l) => String(l.msg).startsWith("vfiod cannot read other processes' open files"));
      expect(warned).toHaveLength(1);
    } finally {
      client.close();
      await vfiod.stop();
    }
  });
});
