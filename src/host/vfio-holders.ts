// The kernel's view of who holds a VFIO device: a process that has the device's
// IOMMU group node (/dev/vfio/<group>) or its device cdev (/dev/vfio/devices/vfioN)
// open shows it in /proc/<pid>/fd (../shared/reference/host-vfio-sysfs.md §1, §6).
// A legacy group node has one opener at a time, and a VMM keeps it open for as long
// as it holds a device of the group, a pending removal included.
//
// Scanning /proc costs one readdir per process and one readlink per open file, with
// no hypervisor asked; concurrent callers share a scan begun after they asked.
// The same scan finds who holds other device nodes open (openers(): a disk's
// /dev/nvme0n1, a GPU's /dev/dri/card0), for managed binding's host-use check.
import fs from "node:fs";
import fsp from "node:fs/promises";
import path from "node:path";
import { setImmediate as yieldToLoop } from "node:timers/promises";
import { FreshReads } from "../fresh-reads";
import type { Logger } from "../log";
import type { PciAddress } from "../pci/address";

/** A process holding a VFIO node open. */
export interface HolderProcess {
  readonly pid: number;
  /** /proc/<pid>/comm ("cloud-hypervisor", "qemu-system-x86", "dpdk-testpmd"). */
  readonly command: string;
  /** /proc/<pid>/cmdline split at NUL; [] when it cannot be read. */
  readonly args: readonly string[];
}

/** The VFIO nodes through which a device can be held. */
export interface VfioNodes {
  /** IOMMU group number, undefined without an iommu_group link. */
  readonly group: string | undefined;
  /** Canonical paths: "/dev/vfio/12", "/dev/vfio/devices/vfio3". */
  readonly nodes: readonly string[];
}

/** Processes scanned between two yields to the event loop. */
const PIDS_PER_TURN = 32;

export class VfioHolders {
  private readonly scans = new FreshReads<Map<string, number[]>>();
  private readonly hostRoot: string;
  private readable: boolean | undefined;

  /**
   * @param procRoot where /proc is read ("/proc"; tests use a fake).
   * @param hostRoot where sys/ and dev/ are read ("/"): a file under it opened by
   *   a test's process counts as the node it stands for.
   */
  constructor(
    private readonly procRoot: string,
    hostRoot: string,
    private readonly log: Logger,
  ) {
    this.hostRoot = path.resolve(hostRoot);
  }

  /**
   * Whether vfiod can read other processes' open files (root, or CAP_SYS_PTRACE).
   * Says so once when it cannot: the in-use check then relies on what vfiod knows.
   */
  canSeeOthers(): boolean {
    if (this.readable !== undefined) return this.readable;
    try {
      fs.readdirSync(path.join(this.procRoot, "1", "fd"));
      this.readable = true;
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      this.readable = code !== "EACCES" && code !== "EPERM";
    }
    if (!this.readable) {
      this.log.warn(
        { procRoot: this.procRoot },
        "vfiod cannot read other processes' open files (not root): a device held by a process vfiod does not " +
          "know is found only when the hypervisor fails to open it",
      );
    }
    return this.readable;
  }

  /** The group node and device cdev of `device`, from sysfs. */
  async nodesOf(device: PciAddress): Promise<VfioNodes> {
    const dir = path.join(this.hostRoot, "sys/bus/pci/devices", device.bdf);
    const group = await fsp.readlink(path.join(dir, "iommu_group")).then(
      (link) => path.basename(link),
      () => undefined,
    );
    const cdevs = await fsp.readdir(path.join(dir, "vfio-dev")).catch(() => [] as string[]);
    return {
      group,
      nodes: [...(group === undefined ? [] : [`/dev/vfio/${group}`]), ...cdevs.map((name) => `/dev/vfio/devices/${name}`)],
    };
  }

  /** The processes holding any of `nodes` open, from a scan begun after this call. */
  async holders(nodes: readonly string[], signal: AbortSignal): Promise<HolderProcess[]> {
    if (nodes.length === 0) return [];
    const index = await this.index(signal);
    const pids = new Set(nodes.flatMap((node) => index.get(node) ?? []));
    return Promise.all([...pids].sort((a, b) => a - b).map((pid) => this.process(pid)));
  }

  /** Every open VFIO node on the host: canonical path -> pids, from a scan begun after this call. */
  index(signal: AbortSignal): Promise<Map<string, number[]>> {
    return this.scans.read("proc", signal, "scanning /proc for open VFIO nodes", () => this.scan());
  }

  /**
   * The processes holding any of `nodes` (canonical paths such as "/dev/nvme0n1")
   * open, by node, from a scan of its own begun now.
   */
  async openers(nodes: readonly string[], signal: AbortSignal): Promise<Map<string, HolderProcess[]>> {
    const wanted = new Set(nodes);
    const found = new Map<string, HolderProcess[]>();
    if (wanted.size === 0) return found;
    signal.throwIfAborted();
    const index = await this.scan((node) => wanted.has(node));
    for (const [node, pids] of index) found.set(node, await Promise.all(pids.map((pid) => this.process(pid))));
    return found;
  }

  /** What /proc says of one process ("?" for a command that cannot be read). */
  async process(pid: number): Promise<HolderProcess> {
    const dir = path.join(this.procRoot, String(pid));
    const [comm, cmdline] = await Promise.all([
      fsp.readFile(path.join(dir, "comm"), "utf8").catch(() => "?"),
      fsp.readFile(path.join(dir, "cmdline"), "utf8").catch(() => ""),
    ]);
    return { pid, command: comm.trim(), args: cmdline.split("\0").filter((arg) => arg !== "") };
  }

  private async scan(wanted: (node: string) => boolean = isVfioNode): Promise<Map<string, number[]>> {
    const index = new Map<string, number[]>();
    let pids: string[];
    try {
      pids = fs.readdirSync(this.procRoot).filter((name) => /^[1-9][0-9]*$/.test(name));
    } catch {
      return index;
    }
    // Synchronous reads in small batches: an async readlink per open file costs a
    // thread-pool round trip each, tens of times the syscall.
    for (let at = 0; at < pids.length; at += PIDS_PER_TURN) {
      for (const pid of pids.slice(at, at + PIDS_PER_TURN)) this.scanProcess(pid, index, wanted);
      await yieldToLoop();
    }
    return index;
  }

  private scanProcess(pid: string, index: Map<string, number[]>, wanted: (node: string) => boolean): void {
    const fdDir = path.join(this.procRoot, pid, "fd");
    let fds: string[];
    try {
      fds = fs.readdirSync(fdDir);
    } catch {
      return; // exited, or not ours to read
    }
    for (const fd of fds) {
      let target: string;
      try {
        target = fs.readlinkSync(path.join(fdDir, fd));
      } catch {
        continue;
      }
      const node = this.canonicalNode(target);
      if (!wanted(node)) continue;
      const holders = index.get(node) ?? [];
      if (!holders.includes(Number(pid))) holders.push(Number(pid));
      index.set(node, holders);
    }
  }

  /** The host path an open file is: "/dev/vfio/12" for that node, also for the file standing in for it under the host root. */
  private canonicalNode(target: string): string {
    return this.hostRoot !== "/" && target.startsWith(`${this.hostRoot}/`) ? target.slice(this.hostRoot.length) : target;
  }
}

function isVfioNode(node: string): boolean {
  return /^\/dev\/vfio\/(?:[0-9]+|devices\/vfio[0-9]+)$/.test(node);
}
