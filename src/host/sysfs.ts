// Reading a PCI function from sysfs under a root prefix ("/" on a real host, a fake
// tree in tests; ../shared/reference/host-vfio-sysfs.md §1). Read-only, and
// synchronous: these attributes are kernel memory, a syscall each, where an async
// read would cost a thread-pool round trip on every Attach.
import fs from "node:fs";
import path from "node:path";

/** One PCI function as sysfs shows it. */
export interface HostFunction {
  readonly bdf: string;
  /** Bound driver name, or undefined when unbound. */
  readonly driver: string | undefined;
  /** PCI class code, e.g. 0x060400 for a PCI-to-PCI bridge. */
  readonly pciClass: number | undefined;
}

/** What ListHostDevices shows of a function besides HostFunction. */
export interface HostFunctionDetails extends HostFunction {
  /** "10de" (hex, no 0x); "" when unreadable. */
  readonly vendor: string;
  readonly device: string;
  /** IOMMU group number; undefined without an iommu_group link. */
  readonly group: string | undefined;
  /** -1 when unknown. */
  readonly numaNode: number;
}

export function pciDevicesDir(root: string): string {
  return path.join(root, "sys/bus/pci/devices");
}

/** The last path element a symlink points to, or undefined when there is no link. */
export function readLinkName(link: string): string | undefined {
  try {
    return path.basename(fs.readlinkSync(link));
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return undefined;
    throw err;
  }
}

/** A sysfs attribute's text, trimmed; undefined when it cannot be read. */
export function readText(file: string): string | undefined {
  try {
    return fs.readFileSync(file, "utf8").trim();
  } catch {
    return undefined;
  }
}

/** A "0x10de\n"-style sysfs number. */
function readHex(file: string): number | undefined {
  const text = readText(file);
  const value = text === undefined ? Number.NaN : Number.parseInt(text, 16);
  return Number.isNaN(value) ? undefined : value;
}

export function readFunction(root: string, bdf: string): HostFunction {
  const dir = path.join(pciDevicesDir(root), bdf);
  return { bdf, driver: readLinkName(path.join(dir, "driver")), pciClass: readHex(path.join(dir, "class")) };
}

export function readFunctionDetails(root: string, bdf: string): HostFunctionDetails {
  const dir = path.join(pciDevicesDir(root), bdf);
  const hex4 = (value: number | undefined) => (value === undefined ? "" : value.toString(16).padStart(4, "0"));
  const fn = readFunction(root, bdf);
  const vendor = readHex(path.join(dir, "vendor"));
  const device = readHex(path.join(dir, "device"));
  const group = readLinkName(path.join(dir, "iommu_group"));
  const numa = readText(path.join(dir, "numa_node"));
  const numaNode = numa === undefined || !/^-?\d+$/.test(numa) ? -1 : Number(numa);
  return { ...fn, vendor: hex4(vendor), device: hex4(device), group, numaNode };
}

/** Every PCI function the host has, by BDF. */
export function listFunctions(root: string): string[] {
  try {
    return fs.readdirSync(pciDevicesDir(root)).sort();
  } catch {
    return [];
  }
}

/** The BDFs of an IOMMU group. */
export function groupMembers(root: string, group: string): string[] {
  return fs.readdirSync(path.join(root, "sys/kernel/iommu_groups", group, "devices")).sort();
}

/**
 * Whether a function is an endpoint a VM can take: not a host bridge, a
 * PCI-to-PCI, CardBus or semi-transparent bridge (class 06, subclass 00/04/07/09).
 */
export function isEndpoint(fn: HostFunction): boolean {
  if (fn.pciClass === undefined || fn.pciClass >> 16 !== 0x06) return true;
  return ![0x00, 0x04, 0x07, 0x09].includes((fn.pciClass >> 8) & 0xff);
}
