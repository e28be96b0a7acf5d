// Reading a PCI function from sysfs under a root prefix ("/" on a real host, a fake
// tree in tests; ../shared/reference/host-vfio-sysfs.md §1). Read-only.
import fs from "node:fs/promises";
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
export async function readLinkName(link: string): Promise<string | undefined> {
  try {
    return path.basename(await fs.readlink(link));
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return undefined;
    throw err;
  }
}

async function readText(file: string): Promise<string | undefined> {
  try {
    return (await fs.readFile(file, "utf8")).trim();
  } catch {
    return undefined;
  }
}

/** A "0x10de\n"-style sysfs number. */
async function readHex(file: string): Promise<number | undefined> {
  const text = await readText(file);
  const value = text === undefined ? Number.NaN : Number.parseInt(text, 16);
  return Number.isNaN(value) ? undefined : value;
}

export async function readFunction(root: string, bdf: string): Promise<HostFunction> {
  const dir = path.join(pciDevicesDir(root), bdf);
  return { bdf, driver: await readLinkName(path.join(dir, "driver")), pciClass: await readHex(path.join(dir, "class")) };
}

export async function readFunctionDetails(root: string, bdf: string): Promise<HostFunctionDetails> {
  const dir = path.join(pciDevicesDir(root), bdf);
  const hex4 = (value: number | undefined) => (value === undefined ? "" : value.toString(16).padStart(4, "0"));
  const [fn, vendor, device, group, numa] = await Promise.all([
    readFunction(root, bdf),
    readHex(path.join(dir, "vendor")),
    readHex(path.join(dir, "device")),
    readLinkName(path.join(dir, "iommu_group")),
    readText(path.join(dir, "numa_node")),
  ]);
  const numaNode = numa === undefined || !/^-?\d+$/.test(numa) ? -1 : Number(numa);
  return { ...fn, vendor: hex4(vendor), device: hex4(device), group, numaNode };
}

/** Every PCI function the host has, by BDF. */
export async function listFunctions(root: string): Promise<string[]> {
  return (await fs.readdir(pciDevicesDir(root)).catch(() => [] as string[])).sort();
}

/** The BDFs of an IOMMU group. */
export async function groupMembers(root: string, group: string): Promise<string[]> {
  return (await fs.readdir(path.join(root, "sys/kernel/iommu_groups", group, "devices"))).sort();
}

/**
 * Whether a function is an endpoint a VM can take: not a host bridge, a
 * PCI-to-PCI, CardBus or semi-transparent bridge (class 06, subclass 00/04/07/09).
 */
export function isEndpoint(fn: HostFunction): boolean {
  if (fn.pciClass === undefined || fn.pciClass >> 16 !== 0x06) return true;
  return ![0x00, 0x04, 0x07, 0x09].includes((fn.pciClass >> 8) & 0xff);
}
