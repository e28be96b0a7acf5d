// A bench host: N Cloud Hypervisor doubles (one per VM, each with its own
// vfio-pci device in one fake sysfs tree, IOMMU groups distinct), the inventory
// file naming them, and a fake /proc in which each VM is a cloud-hypervisor
// process with a VMM's open files. vfiod's in-use check scans /proc, so a host
// with 100 VMs must show 100 VMM processes to it, as a real one would.
import fs from "node:fs";
import path from "node:path";
import { ChDouble, type ChDoubleOptions } from "../test/support/ch-double";
import { buildFakeSysfs, type FakeSysfs } from "../test/support/fake-sysfs";

/** The host BDF of VM i's own device: bus i+1, so up to 255 VMs. */
export function deviceOf(i: number): string {
  return `0000:${(i + 1).toString(16).padStart(2, "0")}:00.0`;
}

/** IOMMU group of VM i's device. */
export function groupOf(i: number): number {
  return i + 1;
}

/** One sysfs tree with `count` vfio-pci functions, one per IOMMU group. */
export function buildBenchSysfs(count: number): FakeSysfs {
  return buildFakeSysfs(Array.from({ length: count }, (_, i) => ({ bdf: deviceOf(i), driver: "vfio-pci", group: groupOf(i) })));
}

export interface BenchVm {
  readonly name: string;
  readonly socket: string;
  readonly double: ChDouble;
  /** The BDF of its own device. */
  readonly device: string;
}

/** Open files of a Cloud Hypervisor VMM with 2 vCPUs, a disk and a NIC (order of magnitude). */
const VMM_FDS = [
  "/dev/null",
  "/dev/null",
  "/dev/null",
  "/dev/kvm",
  "anon_inode:kvm-vm",
  "anon_inode:kvm-vcpu:0",
  "anon_inode:kvm-vcpu:1",
  "/dev/net/tun",
  "/var/lib/vm/disk.img",
  "/var/lib/vm/vmlinux",
  ...Array.from({ length: 30 }, () => "anon_inode:[eventfd]"),
  ...Array.from({ length: 6 }, (_, i) => `socket:[${40_000 + i}]`),
  "anon_inode:[eventpoll]",
  "anon_inode:[timerfd]",
];

export interface BenchHostOptions {
  readonly double?: ChDoubleOptions;
  /** Whether VM i's VMM holds its device's VFIO group open (it has it attached); default none. */
  readonly holding?: (i: number) => boolean;
  /** Whether /proc also shows this machine's own processes (default); the VMMs alone otherwise. */
  readonly hostProcesses?: boolean;
}

/** Fake pids start at or above this, and above every pid this machine has now. */
const FAKE_PID_BASE = 3_000_000;

export class BenchHost {
  private constructor(
    readonly dir: string,
    readonly vms: BenchVm[],
    readonly inventoryFile: string,
    readonly procRoot: string,
    private readonly doubleOptions: ChDoubleOptions,
  ) {}

  /** Starts `count` doubles (VM state Running) under `dir`, writes the inventory file and the fake /proc. */
  static async start(dir: string, sysfs: FakeSysfs, count: number, options: BenchHostOptions = {}): Promise<BenchHost> {
    const { holding = () => false, hostProcesses = true } = options;
    fs.mkdirSync(dir, { recursive: true });
    const vms: BenchVm[] = [];
    const doubleOptions = { sysfsRoot: sysfs.root, ...options.double };
    for (let i = 0; i < count; i++) {
      const socket = path.join(dir, `vm${i}.sock`);
      const double = await ChDouble.start(socket, doubleOptions);
      ejectOnceAnswered(double);
      double.setState("Running");
      vms.push({ name: `vm${i}`, socket, double, device: deviceOf(i) });
    }
    const inventoryFile = path.join(dir, "inventory.json");
    fs.writeFileSync(
      inventoryFile,
      JSON.stringify({ vms: vms.map((vm) => ({ name: vm.name, hypervisor: "cloud-hypervisor", socket: vm.socket })) }),
    );
    const procRoot = path.join(dir, "proc");
    buildFakeProc(procRoot, sysfs.root, vms, holding, hostProcesses);
    return new BenchHost(dir, vms, inventoryFile, procRoot, doubleOptions);
  }

  /** Replaces VM i's double by a new one on the same socket (the old one's hung requests end unanswered). */
  async restart(i: number, prepare: (double: ChDouble) => void = () => {}): Promise<ChDouble> {
    const vm = this.vms[i]!;
    await vm.double.close();
    const double = await ChDouble.start(vm.socket, this.doubleOptions);
    ejectOnceAnswered(double);
    double.setState("Running");
    prepare(double);
    this.vms[i] = { ...vm, double };
    return double;
  }

  async close(): Promise<void> {
    await Promise.all(this.vms.map((vm) => vm.double.close()));
  }
}

/**
 * The guest acks each unplug as soon as remove-device is answered, before any
 * later request is read: a guest that ejects instantly, so a Detach costs its
 * requests and not vfiod's poll interval (100 ms; real guests take 50 ms to
 * seconds). The double's `ejectAfterMs: 0` is a 1 ms timer, which vfiod's next
 * vm.info, one process hop away, can beat. The double has no hook for this: it
 * wraps the double's private set of pending ejects, and throws if that changed.
 */
function ejectOnceAnswered(double: ChDouble): void {
  const pending = (double as unknown as { pendingEject?: unknown }).pendingEject;
  if (!(pending instanceof Set)) throw new Error("ChDouble has no pendingEject set to hook; update bench/host.ts");
  const add = pending.add.bind(pending);
  pending.add = (id: string) => {
    // remove-device routes and writes its reply in one synchronous step: this runs after the reply.
    setImmediate(() => {
      if (pending.has(id)) double.guestEjects(id);
    });
    return add(id);
  };
}

/**
 * A /proc whose entries are this machine's processes (links to /proc/<pid>, as
 * they were now; real procfs, whose readlink costs what it costs on a host) plus
 * one cloud-hypervisor process per VM: comm, a cmdline naming
 * its API socket, and fd/ links like a VMM's, with its device's group node among
 * them when it holds the device.
 */
function buildFakeProc(
  root: string,
  sysfsRoot: string,
  vms: readonly BenchVm[],
  holding: (i: number) => boolean,
  hostProcesses: boolean,
): void {
  fs.mkdirSync(root, { recursive: true });
  const pids = hostProcesses ? fs.readdirSync("/proc").filter((name) => /^[1-9][0-9]*$/.test(name)) : [];
  for (const pid of pids) fs.symlinkSync(path.join("/proc", pid), path.join(root, pid));
  // vfiod checks that it may read other processes' fds by reading /proc/1/fd.
  if (!pids.includes("1")) fs.mkdirSync(path.join(root, "1", "fd"), { recursive: true });
  const firstPid = Math.max(FAKE_PID_BASE, ...pids.map(Number).map((pid) => pid + 1));
  vms.forEach((vm, i) => {
    const dir = path.join(root, String(firstPid + i));
    fs.mkdirSync(path.join(dir, "fd"), { recursive: true });
    fs.writeFileSync(path.join(dir, "comm"), "cloud-hyperviso\n");
    const args = ["cloud-hypervisor", "--api-socket", `path=${vm.socket}`, "--cpus", "boot=2", "--memory", "size=1G"];
    fs.writeFileSync(path.join(dir, "cmdline"), `${args.join("\0")}\0`);
    const targets = [...VMM_FDS];
    if (holding(i)) targets.push(path.join(sysfsRoot, "dev/vfio/vfio"), path.join(sysfsRoot, "dev/vfio", String(groupOf(i))));
    targets.forEach((target, fd) => fs.symlinkSync(target, path.join(dir, "fd", String(fd))));
  });
}
