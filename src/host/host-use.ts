// "Is the host using this PCI device?", asked before managed binding takes it from
// its host driver (../shared/reference/binding-and-events.md §1, "what goes wrong";
// SPDK's setup.sh and NVIDIA's DRA driver refuse the same). Read-only; a device is
// in use when:
//   - a block device on it, or a partition of one, is mounted (/proc/self/mountinfo
//     and init's /proc/1/mountinfo, by major:minor and by source) or swapped on
//     (/proc/swaps), or has holders (device-mapper/LVM, MD: <block>/holders/);
//   - a network interface on it is up (<if>/flags has IFF_UP, or operstate "up");
//   - it is the boot VGA device (boot_vga is 1: the firmware console's framebuffer);
//   - it has SR-IOV virtual functions enabled (sriov_numvfs > 0: unbinding removes them);
//   - a process holds one of its device nodes open (/dev/nvme0n1, /dev/nvme0,
//     /dev/dri/card0...: every node under it, found by its `dev` and uevent DEVNAME,
//     checked in /proc/<pid>/fd by the same scan as VFIO holders).
// What cannot be read is a use too ("cannot tell"): vfiod binds nothing it is unsure of,
// and that includes an attribute the kernel shows under a lock something stuck holds
// (sriov_numvfs and uevent under the device's lock, an interface's flags under RTNL on
// some kernels), read through kernel-reads.ts so it costs 2 s, never the event loop.
//
// The device's sysfs directory is walked (real directories only, never symlinks,
// bounded), so nodes at any depth count: <dev>/nvme/nvme0/nvme0n1/nvme0n1p1,
// <dev>/virtio0/block/vda, <dev>/net/eth0, <dev>/drm/card0. An NVMe controller's
// namespaces under native multipath live elsewhere (/sys/class/nvme-subsystem/
// <subsys>/nvme0n1, beside a link to each controller): they count as its own.
import fs from "node:fs/promises";
import path from "node:path";
import { VfiodError } from "../errors";
import { KERNEL_READ_WAIT_MS, KernelReadStuck, readKernelText } from "./kernel-reads";
import { pciDevicesDir, readText } from "./sysfs";
import { commandLineOf, type VfioHolders } from "./vfio-holders";

/** Directories walked under one device at most: real ones hold tens. */
const MAX_DIRS = 4096;
const MAX_DEPTH = 8;
const IFF_UP = 0x1;
/** Directories that never hold a device node or interface, however many there are (queues, CPUs). */
const SKIP = new Set(["power", "msi_irqs", "mq", "queue", "queues", "statistics", "trace", "integrity", "byte_queue_limits"]);

interface BlockDevice {
  readonly name: string;
  /** "259:1" */
  readonly devno: string;
  /** "/dev/nvme0n1p1" */
  readonly node: string;
  readonly holders: readonly string[];
}

/** What was found under one device's sysfs directory. */
interface DeviceTree {
  readonly blocks: BlockDevice[];
  /** Every device node under it (block and character). */
  readonly nodes: string[];
  readonly interfaces: { readonly name: string; readonly up: boolean }[];
  /** Set when the walk stopped early. */
  incomplete?: string;
}

const STUCK = Symbol("stuck");
/** Why an attribute shown under a kernel lock did not answer. */
const STUCK_ATTRIBUTE = `no answer within ${KERNEL_READ_WAIT_MS / 1000} s (the kernel lock it is shown under is held: a driver stuck probing, unbinding or stopping?)`;

/**
 * An attribute the kernel shows under a lock (the device's, or RTNL for an interface):
 * its text; undefined when it cannot be read; STUCK when it did not answer in time.
 */
function lockedAttribute(file: string): Promise<string | undefined | typeof STUCK> {
  return readKernelText(file).then(
    (text) => text.trim(),
    (err: unknown) => (err instanceof KernelReadStuck ? STUCK : undefined),
  );
}

export class HostUseCheck {
  /**
   * @param sysfsRoot where sys/ is read ("/").
   * @param procRoot where /proc is read ("/proc"): mountinfo, swaps.
   * @param holders the /proc scan, for processes holding the device's nodes open.
   */
  constructor(
    private readonly sysfsRoot: string,
    private readonly procRoot: string,
    private readonly holders: VfioHolders,
  ) {}

  /**
   * Refuses when the host is using any of `bdfs`, naming every use of each.
   * @throws DEVICE_BUSY_ON_HOST (FAILED_PRECONDITION)
   */
  async refuse(bdfs: readonly string[], signal: AbortSignal): Promise<void> {
    const uses = await this.uses(bdfs, signal);
    const busy = [...uses].filter(([, found]) => found.length > 0);
    if (busy.length === 0) return;
    const text = busy.map(([bdf, found]) => `host PCI device ${bdf} is in use by the host: ${found.join("; ")}`).join(". ");
    throw new VfiodError("DEVICE_BUSY_ON_HOST", `${text}. vfiod takes no device the host is using from its driver`, {
      meta: { device: busy[0]![0], uses: busy.map(([bdf, found]) => `${bdf}: ${found.join("; ")}`).join(" | ") },
    });
  }

  /** Each device's uses, in words ([] when the host is not using it). */
  async uses(bdfs: readonly string[], signal: AbortSignal): Promise<Map<string, string[]>> {
    const trees = new Map<string, DeviceTree>();
    const uses = new Map<string, string[]>();
    for (const bdf of bdfs) {
      const found: string[] = [];
      const dir = path.join(pciDevicesDir(this.sysfsRoot), bdf);
      if (readText(path.join(dir, "boot_vga")) === "1") {
        found.push("it is the boot VGA device (the firmware console's framebuffer)");
      }
      const vfs = await lockedAttribute(path.join(dir, "sriov_numvfs"));
      if (vfs === STUCK) found.push(`cannot tell whether it has SR-IOV virtual functions: ${STUCK_ATTRIBUTE}`);
      else if (Number(vfs) > 0) found.push(`it has ${vfs} SR-IOV virtual functions enabled (unbinding its driver removes them)`);
      const tree = await this.walk(dir);
      if (tree.incomplete !== undefined) found.push(`cannot tell: ${tree.incomplete}`);
      for (const net of tree.interfaces) if (net.up) found.push(`network interface ${net.name} is up`);
      for (const block of tree.blocks) {
        if (block.holders.length > 0) {
          found.push(`block device ${block.name} is held by ${block.holders.join(", ")} (device-mapper, LVM or MD: /sys/block/${block.name}/holders)`);
        }
      }
      trees.set(bdf, tree);
      uses.set(bdf, found);
    }
    const all = [...trees.values()];
    if (all.some((tree) => tree.blocks.length > 0)) await this.mountsAndSwaps(trees, uses);
    if (all.some((tree) => tree.nodes.length > 0)) await this.openers(trees, uses, signal);
    return uses;
  }

  private async mountsAndSwaps(trees: Map<string, DeviceTree>, uses: Map<string, string[]>): Promise<void> {
    // vfiod's own mount namespace, and init's (the host's, when vfiod runs in a container with the host's pids).
    // Unreadable, or stuck behind a hung unmount: "cannot tell" below, which refuses.
    const mountinfos = await Promise.all(
      ["self", "1"].map((pid) => readKernelText(path.join(this.procRoot, pid, "mountinfo")).catch(() => undefined)),
    );
    const mounts = mountinfos.flatMap((text) => (text === undefined ? [] : parseMountinfo(text)));
    const swaps: string[] | undefined = await fs.readFile(path.join(this.procRoot, "swaps"), "utf8").then(
      (text) => parseSwaps(text),
      (err: NodeJS.ErrnoException) => (err.code === "ENOENT" ? [] : undefined), // no /proc/swaps: a kernel without swap
    );
    for (const [bdf, tree] of trees) {
      if (tree.blocks.length === 0) continue;
      const found = uses.get(bdf)!;
      if (mountinfos.every((text) => text === undefined)) {
        found.push(`cannot tell whether its block devices are mounted: ${path.join(this.procRoot, "self/mountinfo")} cannot be read`);
      }
      if (swaps === undefined) found.push(`cannot tell whether its block devices are swap: ${path.join(this.procRoot, "swaps")} cannot be read`);
      const seen = new Set<string>();
      for (const block of tree.blocks) {
        for (const mount of mounts) {
          if (mount.devno !== block.devno && mount.source !== block.node) continue;
          const text = `block device ${block.name} is mounted on ${mount.mountPoint} (${mount.fsType})`;
          if (!seen.has(text)) found.push(text);
          seen.add(text);
        }
        if (swaps?.includes(block.node)) found.push(`block device ${block.name} is in use as swap`);
      }
    }
  }

  private async openers(trees: Map<string, DeviceTree>, uses: Map<string, string[]>, signal: AbortSignal): Promise<void> {
    if (!this.holders.canSeeOthers()) {
      for (const [bdf, tree] of trees) {
        if (tree.nodes.length > 0) {
          uses.get(bdf)!.push(`cannot tell whether ${tree.nodes.join(", ")} are open: vfiod cannot read other processes' open files`);
        }
      }
      return;
    }
    const open = await this.holders.openers([...trees.values()].flatMap((tree) => tree.nodes), signal);
    for (const [bdf, tree] of trees) {
      for (const node of tree.nodes) {
        for (const process of open.get(node) ?? []) {
          uses.get(bdf)!.push(`${node} is open by process ${process.pid} (${commandLineOf(process)})`);
        }
      }
    }
  }

  /** Block devices, device nodes and network interfaces under a device's sysfs directory. */
  private async walk(deviceDir: string): Promise<DeviceTree> {
    const tree: DeviceTree = { blocks: [], nodes: [], interfaces: [] };
    let visited = 0;
    const seenBlocks = new Set<string>();
    const visit = async (dir: string, depth: number): Promise<void> => {
      if (tree.incomplete !== undefined) return;
      if (++visited > MAX_DIRS) {
        tree.incomplete = `more than ${MAX_DIRS} directories under ${deviceDir}`;
        return;
      }
      await this.classify(dir, tree, seenBlocks, visit, depth);
      if (depth >= MAX_DEPTH) return;
      const entries = await fs.readdir(dir, { withFileTypes: true }).catch(() => []);
      for (const entry of entries) if (entry.isDirectory() && !SKIP.has(entry.name)) await visit(path.join(dir, entry.name), depth + 1);
    };
    const entries = await fs.readdir(deviceDir, { withFileTypes: true }).catch(() => []);
    for (const entry of entries) if (entry.isDirectory() && !SKIP.has(entry.name)) await visit(path.join(deviceDir, entry.name), 1);
    return tree;
  }

  private async classify(
    dir: string,
    tree: DeviceTree,
    seenBlocks: Set<string>,
    visit: (dir: string, depth: number) => Promise<void>,
    depth: number,
  ): Promise<void> {
    const name = path.basename(dir);
    const subsystem = await fs.readlink(path.join(dir, "subsystem")).then(
      (link) => path.basename(link),
      () => path.basename(path.dirname(dir)), // no subsystem link: the class directory's name (net/eth0)
    );
    if (subsystem === "net") {
      const [flagsText, operstate] = await Promise.all([lockedAttribute(path.join(dir, "flags")), lockedAttribute(path.join(dir, "operstate"))]);
      if (flagsText === STUCK || operstate === STUCK) {
        tree.incomplete = `network interface ${name}: ${STUCK_ATTRIBUTE}`;
        return;
      }
      const flags = Number.parseInt(flagsText ?? "", 16);
      tree.interfaces.push({ name, up: (!Number.isNaN(flags) && (flags & IFF_UP) !== 0) || operstate === "up" });
      return;
    }
    const devno = readText(path.join(dir, "dev"));
    if (devno !== undefined) {
      const uevent = await lockedAttribute(path.join(dir, "uevent"));
      if (uevent === STUCK) {
        tree.incomplete = `${path.join(dir, "uevent")}: ${STUCK_ATTRIBUTE}`;
        return;
      }
      const devname = /^DEVNAME=(.+)$/m.exec(uevent ?? "")?.[1];
      const node = `/dev/${devname ?? name}`;
      if (!tree.nodes.includes(node)) tree.nodes.push(node);
      if (subsystem === "block" && !seenBlocks.has(devno)) {
        seenBlocks.add(devno);
        const holders = await fs.readdir(path.join(dir, "holders")).catch(() => [] as string[]);
        tree.blocks.push({ name, devno, node, holders: holders.sort() });
      }
    }
    // An NVMe controller: under native multipath its namespaces hang off its subsystem.
    if (subsystem === "nvme" && /^nvme\d+$/.test(name)) {
      const classDir = path.join(this.sysfsRoot, "sys/class/nvme-subsystem");
      for (const subsys of await fs.readdir(classDir).catch(() => [] as string[])) {
        const members = await fs.readdir(path.join(classDir, subsys)).catch(() => [] as string[]);
        if (!members.includes(name)) continue;
        for (const head of members.filter((member) => /^nvme\d+n\d+$/.test(member))) {
          await visit(path.join(classDir, subsys, head), depth + 1);
        }
      }
    }
  }
}

interface Mount {
  readonly devno: string;
  readonly mountPoint: string;
  readonly fsType: string;
  readonly source: string;
}

/** proc(5) mountinfo: "36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 - ext3 /dev/root rw". */
export function parseMountinfo(text: string): Mount[] {
  const mounts: Mount[] = [];
  for (const line of text.split("\n")) {
    const [left, right] = line.split(" - ");
    if (left === undefined || right === undefined) continue;
    const fields = left.split(" ");
    const [fsType, source] = right.split(" ");
    if (fields.length < 5 || fsType === undefined) continue;
    mounts.push({ devno: fields[2]!, mountPoint: unescapeOctal(fields[4]!), fsType, source: unescapeOctal(source ?? "") });
  }
  return mounts;
}

/** /proc/swaps: a header, then "Filename Type Size Used Priority" per swap area. */
export function parseSwaps(text: string): string[] {
  return text
    .split("\n")
    .slice(1)
    .map((line) => line.split(/\s+/)[0] ?? "")
    .filter((name) => name !== "")
    .map(unescapeOctal);
}

/** The kernel writes " " as "\040" (and tab, newline, backslash likewise) in these files. */
function unescapeOctal(text: string): string {
  return text.replace(/\\([0-7]{3})/g, (_, octal: string) => String.fromCharCode(Number.parseInt(octal, 8)));
}
