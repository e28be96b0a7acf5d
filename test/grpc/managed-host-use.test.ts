// A managed Attach of a device the host is using is refused, naming the use,
// before anything is written to sysfs or --state-dir and before the hypervisor is
// asked: over real gRPC, on fake sysfs trees and a fake /proc
// (../support/fake-host.ts describes their shape). The same device unused is
// bound and attached, so the check refuses uses, not devices.
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { status } from "@grpc/grpc-js";
import { DeviceAllowList } from "../../src/host/device-allow-list";
import { KERNEL_READ_WAIT_MS } from "../../src/host/kernel-reads";
import { ChDouble } from "../support/ch-double";
import { FakeKernel, RecordingWriter } from "../support/fake-kernel";
import { addDrm, addInterface, addNvme, addNvmeMultipath, buildFakeProc, setAttribute, type FakeProc } from "../support/fake-host";
import { buildFakeSysfs, type FakeFunction, type FakeSysfs } from "../support/fake-sysfs";
import { failure, startTestServer, type TestServer } from "../support/test-server";

const NVME = "0000:03:00.0";
const NIC = "0000:02:00.0";
const GPU = "0000:01:00.0";
const AUDIO = "0000:01:00.1";

const FUNCTIONS: FakeFunction[] = [
  { bdf: NVME, driver: "nvme", group: 30, vendor: "0x144d", device: "0xa808", pciClass: "0x010802" },
  { bdf: NIC, driver: "igb", group: 20, vendor: "0x8086", device: "0x1533", pciClass: "0x020000" },
  { bdf: GPU, driver: "amdgpu", group: 12, vendor: "0x1002", device: "0x73bf", pciClass: "0x030000" },
  { bdf: AUDIO, driver: "snd_hda_intel", group: 12, vendor: "0x1002", device: "0xab28", pciClass: "0x040300" },
];

let dir: string;
let stateDir: string;
let sysfs: FakeSysfs;
let proc: FakeProc;
let writer: RecordingWriter;
let ch: ChDouble;
let server: TestServer | undefined;

async function start(): Promise<TestServer> {
  const inventoryFile = path.join(dir, "inventory.json");
  fs.writeFileSync(inventoryFile, JSON.stringify({ vms: [{ name: "vm", hypervisor: "cloud-hypervisor", socket: ch.socketPath }] }));
  writer = new RecordingWriter(new FakeKernel(sysfs, FUNCTIONS));
  server = await startTestServer({
    inventoryFile,
    sysfsRoot: sysfs.root,
    procRoot: proc.root,
    allowList: DeviceAllowList.parse(FUNCTIONS.map((fn) => fn.bdf).join(","), sysfs.root),
    binding: { stateDir, writer, pollMs: 50 },
  });
  return server;
}

/** A managed Attach refused for the host's use: nothing written anywhere, the VM not asked. */
async function refusedFor(pci: string, wholeGroup = false): Promise<string> {
  const s = await start();
  const refused = await failure(s.client.attach({ vm: "vm", pci, id: "d0", managed: true, wholeGroup }));
  expect(refused).toMatchObject({ code: status.FAILED_PRECONDITION, reason: "DEVICE_BUSY_ON_HOST" });
  expect(writer.writes).toEqual([]);
  expect(fs.existsSync(stateDir) ? fs.readdirSync(stateDir) : []).toEqual([]);
  expect(ch.requests.filter((r) => r.endpoint === "vm.add-device")).toEqual([]);
  return refused.message;
}

beforeEach(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "vfiod-hostuse-"));
  stateDir = path.join(dir, "state");
  sysfs = buildFakeSysfs(FUNCTIONS, { groupNodes: "vfio-bound" });
  proc = buildFakeProc(path.join(dir, "proc"));
  addNvme(sysfs, NVME, "nvme0", [
    {
      name: "nvme0n1",
      devno: "259:0",
      partitions: [
        { name: "nvme0n1p1", devno: "259:1" },
        { name: "nvme0n1p2", devno: "259:2" },
      ],
    },
  ]);
  addInterface(sysfs, NIC, "enp2s0", false);
  addDrm(sysfs, GPU, "card0");
  ch = await ChDouble.start(path.join(dir, "ch.sock"), { sysfsRoot: sysfs.root, ejectAfterMs: 5 });
  ch.setState("Running");
});

afterEach(async () => {
  await server?.stop();
  server = undefined;
  await ch.close();
  sysfs.cleanup();
  fs.rmSync(dir, { recursive: true, force: true });
});

test("a partition of a disk on it mounted (matched by major:minor)", async () => {
  proc.mount("259:1", "/dev/nvme0n1p1", "/data");
  expect(await refusedFor(NVME)).toContain(`host PCI device ${NVME} is in use by the host: block device nvme0n1p1 is mounted on /data (ext4)`);
});

test("a mount the kernel names by source only (btrfs shows an anonymous major:minor), at a path with a space", async () => {
  proc.mount("0:45", "/dev/nvme0n1p2", "/srv/vm images", "btrfs");
  expect(await refusedFor(NVME)).toContain("block device nvme0n1p2 is mounted on /srv/vm images (btrfs)");
});

test("a whole disk mounted in init's mount namespace only (vfiod in a container with the host's pids)", async () => {
  fs.appendFileSync(path.join(proc.root, "1/mountinfo"), "40 22 259:0 / /var/lib/docker rw - xfs /dev/nvme0n1 rw\n");
  expect(await refusedFor(NVME)).toContain("block device nvme0n1 is mounted on /var/lib/docker (xfs)");
});

test("a partition used as swap", async () => {
  proc.swapOn("/dev/nvme0n1p2");
  expect(await refusedFor(NVME)).toContain("block device nvme0n1p2 is in use as swap");
});

test("a partition held by device-mapper (LVM) or MD: its holders/ is not empty", async () => {
  fs.symlinkSync("../../../../../../../virtual/block/dm-0", path.join(sysfs.deviceDir(NVME), "nvme/nvme0/nvme0n1/nvme0n1p2/holders/dm-0"));
  expect(await refusedFor(NVME)).toContain("block device nvme0n1p2 is held by dm-0 (device-mapper, LVM or MD: /sys/block/nvme0n1p2/holders)");
});

test("a namespace under native NVMe multipath (it lives under its subsystem) mounted", async () => {
  const multi = "0000:04:00.0";
  FUNCTIONS.push({ bdf: multi, driver: "nvme", group: 40, pciClass: "0x010802" });
  try {
    sysfs.cleanup();
    sysfs = buildFakeSysfs(FUNCTIONS, { groupNodes: "vfio-bound" });
    addNvmeMultipath(sysfs, multi, "nvme1", "nvme-subsys1", { name: "nvme1n1", devno: "259:7" });
    proc.mount("259:7", "/dev/nvme1n1", "/home");
    expect(await refusedFor(multi)).toContain("block device nvme1n1 is mounted on /home (ext4)");
  } finally {
    FUNCTIONS.pop();
  }
});

test("a process holding one of its device nodes open: the disk, or the controller's character node", async () => {
  proc.holdOpen(4242, "fio", "/dev/nvme0n1");
  proc.holdOpen(4343, "nvme", "/dev/nvme0");
  const message = await refusedFor(NVME);
  expect(message).toContain("/dev/nvme0n1 is open by process 4242 (fio --device /dev/nvme0n1)");
  expect(message).toContain("/dev/nvme0 is open by process 4343 (nvme --device /dev/nvme0)");
});

test("a GPU whose DRM card node a process holds open (Xorg)", async () => {
  proc.holdOpen(777, "Xorg", "/dev/dri/card0");
  expect(await refusedFor(GPU, true)).toContain("/dev/dri/card0 is open by process 777 (Xorg --device /dev/dri/card0)");
});

test("a network interface on it that is up", async () => {
  fs.rmSync(path.join(sysfs.deviceDir(NIC), "net"), { recursive: true });
  addInterface(sysfs, NIC, "enp2s0", true);
  expect(await refusedFor(NIC)).toContain(`host PCI device ${NIC} is in use by the host: network interface enp2s0 is up`);
});

test("the boot VGA device (boot_vga = 1)", async () => {
  setAttribute(sysfs, GPU, "boot_vga", "1");
  expect(await refusedFor(GPU, true)).toContain("it is the boot VGA device");
});

test("a physical function with SR-IOV virtual functions enabled", async () => {
  setAttribute(sysfs, NIC, "sriov_numvfs", "4");
  expect(await refusedFor(NIC)).toContain("it has 4 SR-IOV virtual functions enabled");
});

test("with whole_group, a companion's use refuses the whole attach: neither function is touched", async () => {
  const audio = path.join(sysfs.deviceDir(AUDIO), "sound/card1/controlC1");
  fs.mkdirSync(audio, { recursive: true });
  fs.writeFileSync(path.join(audio, "dev"), "116:2\n");
  fs.writeFileSync(path.join(audio, "uevent"), "MAJOR=116\nMINOR=2\nDEVNAME=snd/controlC1\n");
  proc.holdOpen(555, "pipewire", "/dev/snd/controlC1");
  const message = await refusedFor(GPU, true);
  expect(message).toContain(`host PCI device ${AUDIO} is in use by the host: /dev/snd/controlC1 is open by process 555`);
});

test("what cannot be read is a use too: no mountinfo means vfiod cannot tell whether a disk is mounted", async () => {
  fs.rmSync(path.join(proc.root, "self/mountinfo"));
  fs.rmSync(path.join(proc.root, "1/mountinfo"));
  expect(await refusedFor(NVME)).toContain("cannot tell whether its block devices are mounted");
});

describe("a kernel file that does not answer (a lock held by something stuck) is a use too, answered within the bound", () => {
  /** Replaces `files` by FIFOs no one writes, runs `check`, then lets the blocked reads end. */
  async function withStuck(files: string[], check: () => Promise<void>): Promise<void> {
    for (const file of files) {
      fs.rmSync(file);
      execFileSync("mkfifo", [file]);
    }
    try {
      const started = performance.now();
      await check();
      expect(performance.now() - started).toBeLessThan(KERNEL_READ_WAIT_MS + 3000);
    } finally {
      for (const file of files) fs.closeSync(fs.openSync(file, fs.constants.O_WRONLY | fs.constants.O_NONBLOCK));
    }
  }

  test("mountinfo, behind a hung unmount", async () => {
    await withStuck([path.join(proc.root, "self/mountinfo"), path.join(proc.root, "1/mountinfo")], async () => {
      expect(await refusedFor(NVME)).toContain("cannot tell whether its block devices are mounted");
    });
  });

  test("sriov_numvfs, behind a driver holding the device's lock", async () => {
    setAttribute(sysfs, NIC, "sriov_numvfs", "0");
    await withStuck([path.join(sysfs.deviceDir(NIC), "sriov_numvfs")], async () => {
      expect(await refusedFor(NIC)).toContain("cannot tell whether it has SR-IOV virtual functions: no answer within 2 s");
    });
  });

  test("an interface's flags, behind RTNL", async () => {
    await withStuck([path.join(sysfs.deviceDir(NIC), "net/enp2s0/flags")], async () => {
      expect(await refusedFor(NIC)).toContain("cannot tell: network interface enp2s0: no answer within 2 s");
    });
  });

  test("a DRM node's uevent (its device name), behind the same lock", async () => {
    await withStuck([path.join(sysfs.deviceDir(GPU), "drm/card0/uevent")], async () => {
      expect(await refusedFor(GPU, true)).toMatch(/cannot tell: \S+drm\/card0\/uevent: no answer within 2 s/);
    });
  });
});

test("every use of the device is named, in one refusal", async () => {
  proc.mount("259:1", "/dev/nvme0n1p1", "/data");
  proc.swapOn("/dev/nvme0n1p2");
  proc.holdOpen(4242, "fio", "/dev/nvme0n1");
  const message = await refusedFor(NVME);
  expect(message).toMatch(/mounted on \/data .*; block device nvme0n1p2 is in use as swap; \/dev\/nvme0n1 is open by process 4242/);
  expect(message).toContain("vfiod takes no device the host is using from its driver");
});

test("the same devices, unused (disk unmounted, interface down, no opener), are bound and attached", async () => {
  const s = await start();
  for (const [pci, id] of [[NVME, "disk0"], [NIC, "nic0"]] as const) {
    const { device } = await s.client.attach({ vm: "vm", pci, id, managed: true });
    expect(device?.bdf).toBe(pci);
  }
  expect(writer.writes.map((w) => w.file)).toContain("/sys/bus/pci/drivers_probe");
  // The nvme driver's disk went with it, as the kernel's would.
  expect(fs.existsSync(path.join(sysfs.deviceDir(NVME), "nvme"))).toBe(false);
});
