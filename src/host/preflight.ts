// Host checks before any hypervisor is asked: the device exists, is bound to a
// VFIO driver, and its IOMMU group is viable. Read-only sysfs under a root
// prefix (tests use a fake tree). Facts: ../shared/reference/host-vfio-sysfs.md
// §1, §3, §5, §6.
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { VfiodError } from "../errors";
import type { PciAddress } from "../pci/address";
import { groupMembers, isEndpoint, pciDevicesDir, readFunction, readLinkName, type HostFunction } from "./sysfs";

/** vfio-pci and vendor variants (mlx5_vfio_pci, nvgrace_gpu_vfio_pci, xe-vfio-pci, ...). */
export function isVfioDriver(driver: string): boolean {
  return driver === "vfio-pci" || /[-_]vfio[-_]pci$/.test(driver);
}

/**
 * Whether a group member leaves the group usable for user DMA (§3). From Linux
 * 5.19 the kernel asks each member's driver: unbound, a VFIO driver, pci-stub and
 * pcieport are fine (they mark driver_managed_dma), a bridge on any other driver
 * is not. Before 5.19 any bridge was tolerated whatever its driver.
 */
function keepsGroupViable(fn: HostFunction, dmaOwnership: boolean): boolean {
  if (fn.driver === undefined) return true;
  if (isVfioDriver(fn.driver) || fn.driver === "pci-stub" || fn.driver === "pcieport") return true;
  return !dmaOwnership && fn.pciClass !== undefined && fn.pciClass >> 8 === 0x0604;
}

/** Whether `release` (uname -r) is Linux 5.19 or later, where group viability follows DMA ownership. */
export function hasDmaOwnership(release: string): boolean {
  const match = /^(\d+)\.(\d+)/.exec(release);
  if (match === null) return true; // an unreadable release: the stricter, current rule
  const [major, minor] = [Number(match[1]), Number(match[2])];
  return major > 5 || (major === 5 && minor >= 19);
}

/** The operator's commands (host-vfio-sysfs.md §5) that bind these functions to vfio-pci. */
function bindCommands(functions: readonly { bdf: string; driver: string | undefined }[]): string {
  const perDevice = functions.map(({ bdf, driver }) => {
    const dev = `/sys/bus/pci/devices/${bdf}`;
    const unbind = driver === undefined ? "" : `echo ${bdf} > ${dev}/driver/unbind; `;
    return `echo vfio-pci > ${dev}/driver_override; ${unbind}echo ${bdf} > /sys/bus/pci/drivers_probe`;
  });
  return ["modprobe vfio-pci", ...perDevice].join("; ");
}

/** A managed Attach (AttachRequest.managed): vfiod binds the device, with `wholeGroup` every endpoint of its group. */
export interface ManagedCheck {
  readonly wholeGroup: boolean;
}

/** A device's IOMMU group as preflight found it. */
export interface IommuGroup {
  readonly number: string;
  /** Every function of the group, the device included, by BDF. */
  readonly members: readonly HostFunction[];
}

export class HostPreflight {
  private readonly dmaOwnership: boolean;

  /**
   * @param sysfsRoot where sys/bus/pci/devices and sys/kernel/iommu_groups are read ("/" on a real host).
   * @param kernelRelease the host kernel's release (uname -r), which decides the viability rule.
   */
  constructor(
    private readonly sysfsRoot: string,
    kernelRelease: string = os.release(),
  ) {
    this.dmaOwnership = hasDmaOwnership(kernelRelease);
  }

  /**
   * Refuses a device that cannot be handed to a VM as it stands or, with
   * `managed`, once vfiod has bound it (and, with wholeGroup, its group's other
   * endpoints) to vfio-pci.
   * @returns its IOMMU group: the unit a VM takes (one opener per group).
   * @throws DEVICE_NOT_FOUND, DEVICE_NOT_VFIO, IOMMU_GROUP_NOT_VIABLE
   */
  async check(device: PciAddress, managed?: ManagedCheck): Promise<IommuGroup> {
    const dir = path.join(pciDevicesDir(this.sysfsRoot), device.bdf);
    const meta = { device: device.bdf };
    const stat = fs.statSync(dir, { throwIfNoEntry: false });
    if (stat === undefined || !stat.isDirectory()) {
      throw new VfiodError("DEVICE_NOT_FOUND", `host PCI device ${device.bdf} does not exist`, { meta });
    }
    const self = readFunction(this.sysfsRoot, device.bdf);
    if (managed === undefined && (self.driver === undefined || !isVfioDriver(self.driver))) {
      const current = self.driver === undefined ? "is bound to no driver" : `is bound to ${self.driver}`;
      throw new VfiodError(
        "DEVICE_NOT_VFIO",
        `host PCI device ${device.bdf} ${current}, not vfio-pci; bind it with: ${bindCommands([self])}`,
        { meta: { ...meta, driver: self.driver ?? "" } },
      );
    }
    const group = readLinkName(path.join(dir, "iommu_group"));
    if (group === undefined) {
      throw new VfiodError(
        "IOMMU_GROUP_NOT_VIABLE",
        `host PCI device ${device.bdf} has no IOMMU group: IOMMU off or not in a group; check that the ` +
          "firmware has VT-d / AMD-Vi enabled and the kernel command line has intel_iommu=on (Intel) or " +
          "amd_iommu=on (AMD), and not iommu=off; then reboot (dmesg | grep -i -e DMAR -e IOMMU tells what the kernel found)",
        { meta },
      );
    }
    const offenders: HostFunction[] = [];
    const members: HostFunction[] = [];
    for (const member of groupMembers(this.sysfsRoot, group)) {
      const fn = member === device.bdf ? self : readFunction(this.sysfsRoot, member);
      members.push(fn);
      const willBind = managed?.wholeGroup === true && isEndpoint(fn);
      if (member !== device.bdf && !willBind && !keepsGroupViable(fn, this.dmaOwnership)) offenders.push(fn);
    }
    if (offenders.length > 0) {
      const named = offenders.map((fn) => `${fn.bdf} (driver ${fn.driver})`).join(", ");
      throw new VfiodError(
        "IOMMU_GROUP_NOT_VIABLE",
        `IOMMU group ${group} of ${device.bdf} is not viable: ${named} ` +
          `${offenders.length === 1 ? "is" : "are"} bound to a host driver; bind every device of the group to vfio-pci ` +
          `(or unbind it), e.g. ${bindCommands(offenders)}` +
          (managed === undefined ? "" : "; or attach with managed and whole_group, which binds and attaches the whole group"),
        { meta: { ...meta, iommu_group: group, offenders: offenders.map((fn) => fn.bdf).join(",") } },
      );
    }
    return { number: group, members };
  }
}
