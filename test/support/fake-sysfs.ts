// Builds a fake host sysfs tree with the kernel's relative symlinks, so readlink
// returns what the kernel returns (../shared/reference/host-vfio-sysfs.md §7).
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

export interface FakeSysfs {
  readonly root: string;
  /** Rebinds a function to another driver (undefined = unbind). */
  setDriver(bdf: string, driver: string | undefined): void;
  cleanup(): void;
}

const PORT = "0000:00:01.0";

export function buildFakeSysfs(functions: FakeFunction[]): FakeSysfs {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), "vfiod-sysfs-"));
  const sys = path.join(root, "sys");
  const portDir = path.join(sys, "devices/pci0000:00", PORT);
  fs.mkdirSync(path.join(sys, "bus/pci/devices"), { recursive: true });
  fs.mkdirSync(path.join(sys, "kernel/iommu_groups"), { recursive: true });
  fs.mkdirSync(path.join(root, "dev/vfio"), { recursive: true });

  const deviceDir = (bdf: string) => path.join(portDir, bdf);
  const setDriver = (bdf: string, driver: string | undefined) => {
    const link = path.join(deviceDir(bdf), "driver");
    fs.rmSync(link, { force: true });
    if (driver === undefined) return;
    fs.mkdirSync(path.join(sys, "bus/pci/drivers", driver), { recursive: true });
    fs.symlinkSync(`../../../../bus/pci/drivers/${driver}`, link);
  };

  for (const fn of functions) {
    const dir = deviceDir(fn.bdf);
    fs.mkdirSync(dir, { recursive: true });
    fs.writeFileSync(path.join(dir, "vendor"), `${fn.vendor ?? "0x10de"}\n`);
    fs.writeFileSync(path.join(dir, "device"), `${fn.device ?? "0x2204"}\n`);
    fs.writeFileSync(path.join(dir, "class"), `${fn.pciClass ?? "0x030000"}\n`);
    fs.writeFileSync(path.join(dir, "driver_override"), "(null)\n");
    setDriver(fn.bdf, fn.driver);
    fs.symlinkSync(`../../../devices/pci0000:00/${PORT}/${fn.bdf}`, path.join(sys, "bus/pci/devices", fn.bdf));
    if (fn.group !== undefined) {
      const groupDevices = path.join(sys, "kernel/iommu_groups", String(fn.group), "devices");
      fs.mkdirSync(groupDevices, { recursive: true });
      fs.symlinkSync(`../../../../kernel/iommu_groups/${fn.group}`, path.join(dir, "iommu_group"));
      fs.symlinkSync(`../../../../devices/pci0000:00/${PORT}/${fn.bdf}`, path.join(groupDevices, fn.bdf));
      fs.writeFileSync(path.join(root, "dev/vfio", String(fn.group)), "");
    }
  }
  return { root, setDriver, cleanup: () => fs.rmSync(root, { recursive: true, force: true }) };
}
