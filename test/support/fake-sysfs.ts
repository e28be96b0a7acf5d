// Builds a fake host sysfs tree with the kernel's relative symlinks, so readlink
// returns what the kernel returns (../shared/reference/host-vfio-sysfs.md §7).
// The attributes managed binding writes exist as plain files (driver_override,
// drivers_probe, each driver's unbind), so a writer that never creates files can
// write them; ./fake-kernel.ts plays the kernel's part on such writes.
import fs from "node:fs";
import os from "node:os";
import path from "node:path";

export interface FakeFunction {
  /** Full BDF, e.g. "0000:01:00.0". */
  bdf: string;
  /** Bound driver; omitted = unbound. */
  driver?: string;
  /** IOMMU group number; omitted = no iommu_group link (IOMMU off). */
  group?: number;
  /** "0x030000"-style class; default a display controller. */
  pciClass?: string;
  vendor?: string;
  device?: string;
}

export interface FakeSysfsOptions {
  /**
   * "always" (default): every group has its dev/vfio/<group> node, as if bound.
   * "vfio-bound": only groups with a member on a VFIO driver have one, as on a real host.
   */
  groupNodes?: "always" | "vfio-bound";
}

export interface FakeSysfs {
  readonly root: string;
  /** Rebinds a function to another driver (undefined = unbind). */
  setDriver(bdf: string, driver: string | undefined): void;
  /** The function's real directory (what /sys/bus/pci/devices/<bdf> links to). */
  deviceDir(bdf: string): string;
  cleanup(): void;
}

const PORT = "0000:00:01.0";

/** The modalias sysfs shows for a function: "pci:v000010DEd00002204sv...". */
export function modaliasOf(fn: FakeFunction): string {
  const hex = (text: string | undefined, fallback: string) => (text ?? fallback).replace(/^0x/, "").toUpperCase().padStart(8, "0");
  const cls = (fn.pciClass ?? "0x030000").replace(/^0x/, "").toUpperCase().padStart(6, "0");
  return `pci:v${hex(fn.vendor, "10de")}d${hex(fn.device, "2204")}sv00001234sd00005678bc${cls.slice(0, 2)}sc${cls.slice(2, 4)}i${cls.slice(4, 6)}`;
}

export function isVfioDriverName(driver: string | undefined): boolean {
  return driver !== undefined && (driver === "vfio-pci" || /[-_]vfio[-_]pci$/.test(driver));
}

export function buildFakeSysfs(functions: FakeFunction[], options: FakeSysfsOptions = {}): FakeSysfs {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), "vfiod-sysfs-"));
  const sys = path.join(root, "sys");
  const portDir = path.join(sys, "devices/pci0000:00", PORT);
  fs.mkdirSync(path.join(sys, "bus/pci/devices"), { recursive: true });
  fs.mkdirSync(path.join(sys, "kernel/iommu_groups"), { recursive: true });
  fs.mkdirSync(path.join(root, "dev/vfio"), { recursive: true });
  fs.writeFileSync(path.join(sys, "bus/pci/drivers_probe"), "");

  const deviceDir = (bdf: string) => path.join(portDir, bdf);
  const setDriver = (bdf: string, driver: string | undefined) => {
    const link = path.join(deviceDir(bdf), "driver");
    fs.rmSync(link, { force: true });
    if (driver === undefined) return;
    const driverDir = path.join(sys, "bus/pci/drivers", driver);
    fs.mkdirSync(driverDir, { recursive: true });
    if (!fs.existsSync(path.join(driverDir, "unbind"))) fs.writeFileSync(path.join(driverDir, "unbind"), "");
    fs.symlinkSync(`../../../../bus/pci/drivers/${driver}`, link);
  };

  for (const fn of functions) {
    const dir = deviceDir(fn.bdf);
    fs.mkdirSync(dir, { recursive: true });
    fs.writeFileSync(path.join(dir, "vendor"), `${fn.vendor ?? "0x10de"}\n`);
    fs.writeFileSync(path.join(dir, "device"), `${fn.device ?? "0x2204"}\n`);
    fs.writeFileSync(path.join(dir, "class"), `${fn.pciClass ?? "0x030000"}\n`);
    fs.writeFileSync(path.join(dir, "modalias"), `${modaliasOf(fn)}\n`);
    fs.writeFileSync(path.join(dir, "driver_override"), "(null)\n");
    setDriver(fn.bdf, fn.driver);
    fs.symlinkSync(`../../../devices/pci0000:00/${PORT}/${fn.bdf}`, path.join(sys, "bus/pci/devices", fn.bdf));
    if (fn.group !== undefined) {
      const groupDevices = path.join(sys, "kernel/iommu_groups", String(fn.group), "devices");
      fs.mkdirSync(groupDevices, { recursive: true });
      fs.symlinkSync(`../../../../kernel/iommu_groups/${fn.group}`, path.join(dir, "iommu_group"));
      fs.symlinkSync(`../../../../devices/pci0000:00/${PORT}/${fn.bdf}`, path.join(groupDevices, fn.bdf));
      const bound = functions.some((other) => other.group === fn.group && isVfioDriverName(other.driver));
      if ((options.groupNodes ?? "always") === "always" || bound) fs.writeFileSync(path.join(root, "dev/vfio", String(fn.group)), "");
    }
  }
  return { root, setDriver, deviceDir, cleanup: () => fs.rmSync(root, { recursive: true, force: true }) };
}
