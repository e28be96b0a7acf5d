// What the host's use of a device looks like on a fake tree, for managed
// binding's host-use check (src/host/host-use.ts). Under a function's directory
// (FakeSysfs.deviceDir), as the kernel lays it out:
//
//   <dev>/boot_vga                                   "1" on the boot VGA device
//   <dev>/sriov_numvfs                               "2": VFs enabled
//   <dev>/net/<if>/{flags,operstate}                 "0x1003" (IFF_UP set) / "up"; subsystem -> class/net
//   <dev>/nvme/nvme0/{dev,uevent}                    the controller's char node /dev/nvme0
//   <dev>/nvme/nvme0/nvme0n1/{dev,uevent,holders/}   a disk: dev "259:0", DEVNAME=nvme0n1, subsystem -> class/block
//   <dev>/nvme/nvme0/nvme0n1/nvme0n1p1/{dev,uevent,holders/}   its partitions
//   <dev>/drm/card0/{dev,uevent}                     DEVNAME=dri/card0
//   <root>/sys/class/nvme-subsystem/<subsys>/{nvme0 -> controller, nvme0n1/}   native multipath
//
// and a fake /proc (--proc-root) beside it:
//
//   <proc>/self/mountinfo, <proc>/1/mountinfo        proc(5) lines: "... 259:1 / /data rw - ext4 /dev/nvme0n1p1 rw"
//   <proc>/swaps                                     header, then "/dev/nvme0n1p2 partition ..."
//   <proc>/<pid>/fd/<n> -> /dev/nvme0n1, <proc>/<pid>/{comm,cmdline}   a process holding a node open
import fs from "node:fs";
import path from "node:path";
import type { FakeSysfs } from "./fake-sysfs";

export interface FakeDisk {
  /** "nvme0n1" */
  name: string;
  /** "259:0" */
  devno: string;
  partitions?: { name: string; devno: string; holders?: string[] }[];
  holders?: string[];
}

function classDir(dir: string, subsystem: string, depth: number): void {
  fs.symlinkSync(`${"../".repeat(depth)}class/${subsystem}`, path.join(dir, "subsystem"));
}

function node(dir: string, devno: string, devname: string, subsystem: string, extra = ""): void {
  fs.mkdirSync(path.join(dir, "holders"), { recursive: true });
  fs.writeFileSync(path.join(dir, "dev"), `${devno}\n`);
  const [major, minor] = devno.split(":");
  fs.writeFileSync(path.join(dir, "uevent"), `MAJOR=${major}\nMINOR=${minor}\nDEVNAME=${devname}\n${extra}`);
  classDir(dir, subsystem, 9);
}

function blockDevice(dir: string, disk: { name: string; devno: string; holders?: string[] }, type: string): void {
  fs.mkdirSync(dir, { recursive: true });
  node(dir, disk.devno, disk.name, "block", `DEVTYPE=${type}\n`);
  for (const holder of disk.holders ?? []) fs.symlinkSync(`../../../../virtual/block/${holder}`, path.join(dir, "holders", holder));
}

/** An NVMe controller with namespaces (and partitions) under the function, as the nvme driver makes them. */
export function addNvme(sysfs: FakeSysfs, bdf: string, controller: string, disks: FakeDisk[], controllerDevno = "241:0"): void {
  const ctrl = path.join(sysfs.deviceDir(bdf), "nvme", controller);
  fs.mkdirSync(ctrl, { recursive: true });
  node(ctrl, controllerDevno, controller, "nvme");
  for (const disk of disks) {
    blockDevice(path.join(ctrl, disk.name), disk, "disk");
    for (const part of disk.partitions ?? []) blockDevice(path.join(ctrl, disk.name, part.name), part, "partition");
  }
}

/** Native NVMe multipath: the namespace lives under its subsystem, beside a link to the controller. */
export function addNvmeMultipath(sysfs: FakeSysfs, bdf: string, controller: string, subsys: string, disk: FakeDisk): void {
  const ctrl = path.join(sysfs.deviceDir(bdf), "nvme", controller);
  fs.mkdirSync(ctrl, { recursive: true });
  node(ctrl, "241:0", controller, "nvme");
  const dir = path.join(sysfs.root, "sys/devices/virtual/nvme-subsystem", subsys);
  fs.mkdirSync(dir, { recursive: true });
  fs.symlinkSync(path.relative(dir, ctrl), path.join(dir, controller));
  blockDevice(path.join(dir, disk.name), disk, "disk");
  for (const part of disk.partitions ?? []) blockDevice(path.join(dir, disk.name, part.name), part, "partition");
  const cls = path.join(sysfs.root, "sys/class/nvme-subsystem");
  fs.mkdirSync(cls, { recursive: true });
  fs.symlinkSync(`../../devices/virtual/nvme-subsystem/${subsys}`, path.join(cls, subsys));
}

/** A network interface the NIC's driver created. */
export function addInterface(sysfs: FakeSysfs, bdf: string, name: string, up: boolean): void {
  const dir = path.join(sysfs.deviceDir(bdf), "net", name);
  fs.mkdirSync(dir, { recursive: true });
  fs.writeFileSync(path.join(dir, "flags"), up ? "0x1003\n" : "0x1002\n");
  fs.writeFileSync(path.join(dir, "operstate"), up ? "up\n" : "down\n");
  classDir(dir, "net", 9);
}

/** A DRM card node (/dev/dri/<card>). */
export function addDrm(sysfs: FakeSysfs, bdf: string, card: string, devno = "226:0"): void {
  const dir = path.join(sysfs.deviceDir(bdf), "drm", card);
  fs.mkdirSync(dir, { recursive: true });
  node(dir, devno, `dri/${card}`, "drm");
}

export function setAttribute(sysfs: FakeSysfs, bdf: string, name: "boot_vga" | "sriov_numvfs", value: string): void {
  fs.writeFileSync(path.join(sysfs.deviceDir(bdf), name), `${value}\n`);
}

export interface FakeProc {
  readonly root: string;
  /** A filesystem on `source` (major:minor `devno`) mounted at `mountPoint`. */
  mount(devno: string, source: string, mountPoint: string, fsType?: string): void;
  swapOn(file: string): void;
  /** Process `pid` (command `comm`) holds `file` open. */
  holdOpen(pid: number, comm: string, file: string): void;
}

/** A fake /proc with a root mount and no swap, no processes. */
export function buildFakeProc(root: string): FakeProc {
  const lines = ["22 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw"];
  const swaps = ["Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority"];
  const escape = (text: string) => text.replace(/ /g, "\\040");
  const write = () => {
    for (const pid of ["self", "1"]) {
      fs.mkdirSync(path.join(root, pid), { recursive: true });
      fs.writeFileSync(path.join(root, pid, "mountinfo"), `${lines.join("\n")}\n`);
    }
    fs.writeFileSync(path.join(root, "swaps"), `${swaps.join("\n")}\n`);
  };
  write();
  let id = 100;
  return {
    root,
    mount(devno, source, mountPoint, fsType = "ext4") {
      lines.push(`${id++} 22 ${devno} / ${escape(mountPoint)} rw,relatime shared:${id} - ${fsType} ${source} rw`);
      write();
    },
    swapOn(file) {
      swaps.push(`${file}                               partition\t1048572\t\t0\t\t-2`);
      write();
    },
    holdOpen(pid, comm, file) {
      const dir = path.join(root, String(pid));
      fs.mkdirSync(path.join(dir, "fd"), { recursive: true });
      fs.writeFileSync(path.join(dir, "comm"), `${comm}\n`);
      fs.writeFileSync(path.join(dir, "cmdline"), `${comm}\0--device\0${file}\0`);
      const fds = fs.readdirSync(path.join(dir, "fd")).length;
      fs.symlinkSync(file, path.join(dir, "fd", String(fds + 3)));
    },
  };
}
