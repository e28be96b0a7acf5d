// The kernel's part in managed binding, played on a fake sysfs tree
// (./fake-sysfs.ts, groupNodes "vfio-bound"), for the writes vfiod makes
// (../shared/reference/host-vfio-sysfs.md §5):
//   /sys/bus/pci/devices/<bdf>/driver_override   "vfio-pci" sets it, "\n" clears it ("(null)")
//   /sys/bus/pci/devices/<bdf>/driver/unbind     (= drivers/<drv>/unbind) "<bdf>": the driver
//                                                 link goes; ENODEV when not bound to that driver
//   /sys/bus/pci/drivers_probe                    "<bdf>": an unbound device is bound to its
//                                                 override, else to its own driver, when loaded
// A VFIO driver bound creates dev/vfio/<group> (and vfio-dev/vfio<N>/dev); the last
// VFIO member of a group unbound removes it. A host driver unbound takes the children
// it created with it (net/, nvme/, drm/: an interface, a disk), and gives them back
// when it binds again.
//
// Two ways in: apply() for an in-process vfiod (RecordingWriter calls it on each
// write, so errors reach the writer as the kernel's would), and follow() for a vfiod
// process writing the files itself (polled; unbind and drivers_probe files are
// emptied once acted on).
import fs from "node:fs";
import path from "node:path";
import type { SysfsWriter } from "../../src/host/sysfs-writer";
import { isVfioDriverName, type FakeFunction, type FakeSysfs } from "./fake-sysfs";

/** Directories a host driver creates under its device (and removes when unbound). */
const DRIVER_CHILDREN = ["net", "nvme", "drm", "block"];

export interface FakeKernelOptions {
  /** The driver a probe without override binds (default: each function's initial driver, unless a VFIO one). */
  defaults?: Record<string, string | undefined>;
  /** Loaded drivers besides those the tree has: vfio-pci by default. */
  loaded?: string[];
  /** A probe binds nothing for these devices (a driver that refuses them). */
  refuseProbe?: string[];
}

export class FakeKernel {
  private readonly defaults: Record<string, string | undefined>;
  private nextCdev = 0;

  constructor(
    private readonly sysfs: FakeSysfs,
    private readonly functions: FakeFunction[],
    private readonly options: FakeKernelOptions = {},
  ) {
    this.defaults =
      options.defaults ??
      Object.fromEntries(functions.map((fn) => [fn.bdf, isVfioDriverName(fn.driver) ? undefined : fn.driver]));
    for (const driver of options.loaded ?? ["vfio-pci"]) this.load(driver);
  }

  /** Makes a driver loaded: its directory with an unbind file. */
  load(driver: string): void {
    const dir = path.join(this.sysfs.root, "sys/bus/pci/drivers", driver);
    fs.mkdirSync(dir, { recursive: true });
    if (!fs.existsSync(path.join(dir, "unbind"))) fs.writeFileSync(path.join(dir, "unbind"), "");
  }

  /** What the kernel does on `value` written to `file` (a host path). @throws an errno Error as the kernel would refuse. */
  apply(file: string, value: string): void {
    let match = /^\/sys\/bus\/pci\/devices\/([^/]+)\/driver_override$/.exec(file);
    if (match !== null) {
      this.requireDevice(match[1]!);
      const driver = value.split("\n")[0]!.trim();
      fs.writeFileSync(this.attr(match[1]!, "driver_override"), driver === "" ? "(null)\n" : `${driver}\n`);
      return;
    }
    match = /^\/sys\/bus\/pci\/devices\/([^/]+)\/driver\/unbind$/.exec(file);
    if (match !== null) {
      const driver = this.driverOf(match[1]!);
      if (driver === undefined) throw errno("ENOENT", file);
      this.unbind(driver, value.trim(), file);
      return;
    }
    match = /^\/sys\/bus\/pci\/drivers\/([^/]+)\/unbind$/.exec(file);
    if (match !== null) {
      this.unbind(match[1]!, value.trim(), file);
      return;
    }
    if (file === "/sys/bus/pci/drivers_probe") {
      this.probe(value.trim(), file);
      return;
    }
    throw errno("EACCES", file);
  }

  /** Acts on a vfiod process's writes to the tree's files until the returned function is called. */
  follow(intervalMs = 5): () => void {
    const root = this.sysfs.root;
    const probeFile = path.join(root, "sys/bus/pci/drivers_probe");
    const tick = () => {
      // drivers_probe first: what was written before it (override, unbind) is then visible too.
      const probe = readOrEmpty(probeFile).trim();
      const driversDir = path.join(root, "sys/bus/pci/drivers");
      const unbinds = fs.readdirSync(driversDir).map((driver) => ({ driver, value: readOrEmpty(path.join(driversDir, driver, "unbind")).trim() }));
      for (const { driver, value } of unbinds) {
        if (value === "") continue;
        fs.truncateSync(path.join(driversDir, driver, "unbind"));
        try {
          this.unbind(driver, value, "unbind");
        } catch {
          // the kernel would have answered ENODEV
        }
      }
      if (probe !== "") {
        fs.truncateSync(probeFile);
        try {
          this.probe(probe, "drivers_probe");
        } catch {
          // likewise
        }
      }
    };
    const timer = setInterval(tick, intervalMs);
    return () => clearInterval(timer);
  }

  /** The driver bound now, or undefined. */
  driverOf(bdf: string): string | undefined {
    try {
      return path.basename(fs.readlinkSync(path.join(this.sysfs.deviceDir(bdf), "driver")));
    } catch {
      return undefined;
    }
  }

  /** driver_override as set (undefined when "(null)" or empty). */
  override(bdf: string): string | undefined {
    const first = readOrEmpty(this.attr(bdf, "driver_override")).split("\n")[0]!.trim();
    return first === "" || first === "(null)" ? undefined : first;
  }

  private unbind(driver: string, bdf: string, file: string): void {
    if (this.driverOf(bdf) !== driver) throw errno("ENODEV", file);
    this.sysfs.setDriver(bdf, undefined);
    const dir = this.sysfs.deviceDir(bdf);
    if (isVfioDriverName(driver)) {
      fs.rmSync(path.join(dir, "vfio-dev"), { recursive: true, force: true });
      const group = this.groupOf(bdf);
      const stillBound = this.functions.some((fn) => fn.group !== undefined && String(fn.group) === group && isVfioDriverName(this.driverOf(fn.bdf)));
      if (group !== undefined && !stillBound) fs.rmSync(path.join(this.sysfs.root, "dev/vfio", group), { force: true });
      return;
    }
    // The host driver's children go with it, to come back when it binds again.
    const stash = this.stashOf(bdf);
    for (const child of DRIVER_CHILDREN) {
      if (!fs.existsSync(path.join(dir, child))) continue;
      fs.mkdirSync(stash, { recursive: true });
      fs.renameSync(path.join(dir, child), path.join(stash, child));
    }
  }

  private probe(bdf: string, file: string): void {
    this.requireDevice(bdf);
    if (this.driverOf(bdf) !== undefined) return; // bound already: a probe changes nothing
    if (this.options.refuseProbe?.includes(bdf)) return;
    const driver = this.override(bdf) ?? this.defaults[bdf];
    if (driver === undefined || !fs.existsSync(path.join(this.sysfs.root, "sys/bus/pci/drivers", driver))) return;
    this.sysfs.setDriver(bdf, driver);
    const dir = this.sysfs.deviceDir(bdf);
    if (isVfioDriverName(driver)) {
      const group = this.groupOf(bdf);
      if (group !== undefined) fs.writeFileSync(path.join(this.sysfs.root, "dev/vfio", group), "");
      const cdev = path.join(dir, "vfio-dev", `vfio${this.nextCdev++}`);
      fs.mkdirSync(cdev, { recursive: true });
      fs.writeFileSync(path.join(cdev, "dev"), `511:${this.nextCdev}\n`);
      return;
    }
    const stash = this.stashOf(bdf);
    for (const child of DRIVER_CHILDREN) {
      if (fs.existsSync(path.join(stash, child))) fs.renameSync(path.join(stash, child), path.join(dir, child));
    }
    void file;
  }

  private requireDevice(bdf: string): void {
    if (!this.functions.some((fn) => fn.bdf === bdf)) throw errno("ENODEV", bdf);
  }

  private groupOf(bdf: string): string | undefined {
    const group = this.functions.find((fn) => fn.bdf === bdf)?.group;
    return group === undefined ? undefined : String(group);
  }

  private attr(bdf: string, name: string): string {
    return path.join(this.sysfs.deviceDir(bdf), name);
  }

  private stashOf(bdf: string): string {
    return path.join(this.sysfs.root, ".driver-children", bdf);
  }
}

/** One write as vfiod made it. */
export interface SysfsWrite {
  readonly file: string;
  readonly value: string;
}

/** A SysfsWriter that records every write and, with a kernel, has it act on the fake tree. */
export class RecordingWriter implements SysfsWriter {
  readonly writes: SysfsWrite[] = [];
  private readonly failures: { file: string; code: string; times: number }[] = [];

  constructor(private readonly kernel?: FakeKernel) {}

  /** The next `times` writes to `file` fail with errno `code` (as an I/O error would), changing nothing. */
  fail(file: string, code: string, times = 1): void {
    this.failures.push({ file, code, times });
  }

  async write(file: string, value: string): Promise<void> {
    this.writes.push({ file, value });
    const failure = this.failures.find((f) => f.file === file && f.times > 0);
    if (failure !== undefined) {
      failure.times -= 1;
      throw errno(failure.code, file);
    }
    this.kernel?.apply(file, value);
  }
}

function readOrEmpty(file: string): string {
  try {
    return fs.readFileSync(file, "utf8");
  } catch {
    return "";
  }
}

function errno(code: string, file: string): NodeJS.ErrnoException {
  return Object.assign(new Error(`${code}: ${file}`), { code });
}
