// The kernel's view of who holds a VFIO device: a process that has the device's
// IOMMU group node (/dev/vfio/<group>) or its device cdev (/dev/vfio/devices/vfioN)
// open shows it in /proc/<pid>/fd (../shared/reference/host-vfio-sysfs.md §1, §6).
// A legacy group node has one opener at a time, and a VMM keeps it open for as long
// as it holds a device of the group, a pending removal included.
//
// A scan costs one stat per process: the kernel reports how many files a process
// has open as the size of /proc/<pid>/fd (Linux 6.2+), and only a process whose count
// changed since the last scan has its open files read again (a readlink each). A
// process with no open files at all (a kernel thread; a host has hundreds) is not
// looked at again for a second. No hypervisor is asked, and concurrent callers
// share a scan begun after they asked.
// What a scan can miss: a process that swapped one open file for a group node
// between two scans, keeping its count, until its count changes; and, for up to a
// second, one that opened a group node as its first open file (or took a pid freed
// in that second). The kernel still refuses the second opener (EBUSY), which the
// hypervisor reports and vfiod answers as DEVICE_IN_USE.
// A scan of its own, reading every open file, finds who holds other device nodes
// open (openers(): a disk's /dev/nvme0n1, a GPU's /dev/dri/card0), for managed
// binding's host-use check.
import fs from "node:fs";
import fsp from "node:fs/promises";
import path from "node:path";
import { setImmediate as yieldToLoop } from "node:timers/promises";
import { FreshReads } from "../fresh-reads";
import { readCommandLine } from "./kernel-reads";
import type { Logger } from "../log";
import type { PciAddress } from "../pci/address";
import { pciDevicesDir, readLinkName } from "./sysfs";

/** A process holding a VFIO node open. */
export interface HolderProcess {
  readonly pid: number;
  /** /proc/<pid>/comm ("cloud-hypervisor", "qemu-system-x86", "dpdk-testpmd"). */
  readonly command: string;
  /** /proc/<pid>/cmdline split at NUL; [] when it cannot be read. */
  readonly args: readonly string[];
}

/** A command line shown in messages: long enough to tell a VMM from a DPDK app. */
const MAX_COMMAND = 120;

/** The process's command line (its comm when that cannot be read), cut at MAX_COMMAND characters. */
export function commandLineOf(process: HolderProcess): string {
  const line = process.args.length > 0 ? process.args.join(" ") : process.command;
  return line.length > MAX_COMMAND ? `${line.slice(0, MAX_COMMAND)}...` : line;
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

/** How long a process seen with no open files is taken to have none still. */
const NO_FILES_RECHECK_MS = 1000;

/** Whether this kernel reports a process's open files as the size of /proc/<pid>/fd (6.2+): vfiod has some open. */
const KERNEL_COUNTS_OPEN_FILES = (() => {
  try {
    return fs.statSync("/proc/self/fd").size > 0;
  } catch {
    return false;
  }
})();

export class VfioHolders {
  private readonly scans = new FreshReads<Map<string, number[]>>();
  /** What the last look at each process found: its open-file count, the VFIO nodes among them, and when. */
  private readonly seen = new Map<string, { readonly count: number; readonly nodes: readonly string[]; readonly at: number }>();
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
  nodesOf(device: PciAddress): VfioNodes {
    const dir = path.join(pciDevicesDir(this.hostRoot), device.bdf);
    const group = readLinkName(path.join(dir, "iommu_group"));
    // Absent unless bound to a VFIO driver on a kernel with device cdevs.
    const cdevDir = path.join(dir, "vfio-dev");
    const cdevs = fs.existsSync(cdevDir) ? fs.readdirSync(cdevDir) : [];
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
   * open, by node, from a full scan of its own begun now.
   */
  async openers(nodes: readonly string[], signal: AbortSignal): Promise<Map<string, HolderProcess[]>> {
    const wanted = new Set(nodes);
    const found = new Map<string, HolderProcess[]>();
    if (wanted.size === 0) return found;
    signal.throwIfAborted();
    const index = new Map<string, number[]>();
    await this.eachProcess((pid) => {
      for (const node of this.openFiles(pid).filter((file) => wanted.has(file))) {
        index.set(node, [...(index.get(node) ?? []), Number(pid)]);
      }
    });
    for (const [node, pids] of index) found.set(node, await Promise.all(pids.map((pid) => this.process(pid))));
    return found;
  }

  /**
   * What /proc says of one process ("?" for a command that cannot be read; no
   * arguments when they cannot be read, or not within readCommandLine's bound).
   */
  async process(pid: number): Promise<HolderProcess> {
    const dir = path.join(this.procRoot, String(pid));
    const [comm, args] = await Promise.all([
      fsp.readFile(path.join(dir, "comm"), "utf8").catch(() => "?"),
      readCommandLine(path.join(dir, "cmdline")).catch(() => []),
    ]);
    return { pid, command: comm.trim(), args };
  }

  private async scan(): Promise<Map<string, number[]>> {
    const index = new Map<string, number[]>();
    const alive = new Set<string>();
    const now = performance.now();
    await this.eachProcess((pid) => {
      alive.add(pid);
      for (const node of this.nodesHeldBy(pid, now)) index.set(node, [...(index.get(node) ?? []), Number(pid)]);
    });
    for (const pid of this.seen.keys()) if (!alive.has(pid)) this.seen.delete(pid);
    return index;
  }

  /**
   * Calls `visit` for every process, with synchronous reads in small batches: an
   * async stat or readlink costs a thread-pool round trip each, tens of times the syscall.
   */
  private async eachProcess(visit: (pid: string) => void): Promise<void> {
    // vfiod itself holds no device node open, and its own open files change with every call.
    const self = String(process.pid);
    let pids: string[];
    try {
      pids = fs.readdirSync(this.procRoot).filter((name) => /^[1-9][0-9]*$/.test(name) && name !== self);
    } catch {
      return;
    }
    for (let at = 0; at < pids.length; at += PIDS_PER_TURN) {
      pids.slice(at, at + PIDS_PER_TURN).forEach(visit);
      await yieldToLoop();
    }
  }

  /**
   * The VFIO nodes process `pid` has open: read again only when its open-file count
   * changed, and not looked at within NO_FILES_RECHECK_MS of having none.
   */
  private nodesHeldBy(pid: string, now: number): readonly string[] {
    const last = this.seen.get(pid);
    if (KERNEL_COUNTS_OPEN_FILES && last?.count === 0 && now - last.at < NO_FILES_RECHECK_MS) return [];
    let count: number | undefined;
    try {
      count = fs.statSync(`${this.procRoot}/${pid}/fd`, { throwIfNoEntry: false })?.size;
    } catch {
      count = undefined; // not ours to read
    }
    if (count === undefined) {
      this.seen.delete(pid);
      return []; // exited, or not ours to read
    }
    // Kernels before 6.2 report 0 for every process: no shortcut there. On later ones 0
    // means none (kernel threads), so there is nothing to read.
    if (count === 0 && KERNEL_COUNTS_OPEN_FILES) {
      this.seen.set(pid, { count, nodes: [], at: now });
      return [];
    }
    if (last !== undefined && count !== 0 && last.count === count) return last.nodes;
    const nodes = [...new Set(this.openFiles(pid).filter(isVfioNode))];
    this.seen.set(pid, { count, nodes, at: now });
    return nodes;
  }

  /** The host paths of every file process `pid` has open ([] when it exited or is not ours to read). */
  private openFiles(pid: string): string[] {
    const fdDir = path.join(this.procRoot, pid, "fd");
    let fds: string[];
    try {
      fds = fs.readdirSync(fdDir);
    } catch {
      return [];
    }
    const files: string[] = [];
    for (const fd of fds) {
      try {
        files.push(this.canonicalNode(fs.readlinkSync(path.join(fdDir, fd))));
      } catch {
        // closed meanwhile
      }
    }
    return files;
  }

  /** The host path an open file is: "/dev/vfio/12" for that node, also for the file standing in for it under the host root. */
  private canonicalNode(target: string): string {
    return this.hostRoot !== "/" && target.startsWith(`${this.hostRoot}/`) ? target.slice(this.hostRoot.length) : target;
  }
}

function isVfioNode(node: string): boolean {
  return /^\/dev\/vfio\/(?:[0-9]+|devices\/vfio[0-9]+)$/.test(node);
}
