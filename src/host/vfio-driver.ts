// Which VFIO driver a device should be bound to: a vfio-pci variant driver named
// for it (mlx5_vfio_pci, nvgrace_gpu_vfio_pci, ...) when one is loaded, else
// vfio-pci. As libvirt's virPCIDeviceFindBestVFIOVariant (src/util/virpci.c,
// ../shared/reference/binding-and-events.md §1): the `alias vfio_pci:...` lines
// of /lib/modules/<release>/modules.alias are matched field by field (v, d, sv,
// sd, bc, sc, i; "*" matches any value) against the device's `modalias`, and the
// match with the fewest wildcards wins (the first of equals). libvirt loads the
// module if needed; vfiod loads no modules: a variant that is not loaded is
// skipped, and said so.
import { existsSync } from "node:fs";
import fs from "node:fs/promises";
import path from "node:path";
import { pciDevicesDir } from "./sysfs";

const ALIAS_PREFIX = "alias vfio_pci:";

/** "v000010DEd00002204sv...i00" -> its seven fields, or undefined when it has another shape. */
export function parseModalias(text: string): string[] | undefined {
  const match = /^v(\S*?)d(\S*?)sv(\S*?)sd(\S*?)bc(\S*?)sc(\S*?)i(\S*)$/.exec(text.trim());
  return match === null ? undefined : match.slice(1).map((field) => field.toUpperCase());
}

/** The module named by the best `alias vfio_pci:` line for `modalias` ("pci:v..."), or undefined. */
export function bestVariant(modulesAlias: string, modalias: string): string | undefined {
  const device = modalias.trim().startsWith("pci:") ? parseModalias(modalias.trim().slice(4)) : undefined;
  if (device === undefined) return undefined;
  let best: { module: string; wildcards: number } | undefined;
  for (const line of modulesAlias.split("\n")) {
    if (!line.startsWith(ALIAS_PREFIX)) continue;
    const [pattern, module] = line.slice(ALIAS_PREFIX.length).trim().split(/\s+/);
    const fields = pattern === undefined ? undefined : parseModalias(pattern);
    if (fields === undefined || module === undefined) continue;
    const matches = fields.every((field, i) => field === "*" || field === device[i]);
    const wildcards = fields.filter((field) => field === "*").length;
    if (matches && (best === undefined || wildcards < best.wildcards)) best = { module, wildcards };
  }
  return best?.module;
}

/** The driver to bind a device to, and why. */
export interface VfioDriverChoice {
  /** "vfio-pci", or a variant's PCI driver name. */
  readonly driver: string;
  /** Said in logs and events when a variant was named but is not used. */
  readonly note?: string;
}

export class VfioDriverChooser {
  private cache: { key: string; text: string } | undefined;

  /**
   * @param root where sys/ and lib/modules/ are read ("/").
   * @param kernelRelease uname -r, whose modules.alias is read.
   */
  constructor(
    private readonly root: string,
    private readonly kernelRelease: string,
  ) {}

  /** Whether vfio-pci itself is loaded (its driver directory exists). */
  vfioPciLoaded(): boolean {
    return existsSync(path.join(this.root, "sys/bus/pci/drivers/vfio-pci"));
  }

  async choose(bdf: string): Promise<VfioDriverChoice> {
    const modalias = await fs.readFile(path.join(pciDevicesDir(this.root), bdf, "modalias"), "utf8").catch(() => "");
    const aliases = await this.modulesAlias();
    const module = aliases === undefined ? undefined : bestVariant(aliases, modalias);
    if (module === undefined) return { driver: "vfio-pci" };
    const driver = await this.pciDriverOf(module);
    if (driver !== undefined) return { driver };
    return { driver: "vfio-pci", note: `variant driver ${module} is named for it but not loaded (modprobe ${module} to use it)` };
  }

  /** The PCI driver a loaded module registers (/sys/module/<m>/drivers/pci:<name>), else a driver of that name. */
  private async pciDriverOf(module: string): Promise<string | undefined> {
    const drivers = await fs.readdir(path.join(this.root, "sys/module", module, "drivers")).catch(() => [] as string[]);
    const registered = drivers.find((name) => name.startsWith("pci:"))?.slice("pci:".length);
    const candidates = [registered, module, module.replaceAll("_", "-")].filter((name): name is string => name !== undefined);
    return candidates.find((name) => existsSync(path.join(this.root, "sys/bus/pci/drivers", name)));
  }

  /** modules.alias of the running kernel, re-read only when it changes; undefined when absent. */
  private async modulesAlias(): Promise<string | undefined> {
    const file = path.join(this.root, "lib/modules", this.kernelRelease, "modules.alias");
    const stat = await fs.stat(file).catch(() => undefined);
    if (stat === undefined) return undefined;
    const key = `${stat.mtimeMs}/${stat.size}`;
    if (this.cache?.key !== key) {
      const text = await fs.readFile(file, "utf8").catch(() => undefined);
      if (text === undefined) return undefined;
      // Only the vfio_pci lines matter; the file is megabytes.
      this.cache = { key, text: text.split("\n").filter((line) => line.startsWith(ALIAS_PREFIX)).join("\n") };
    }
    return this.cache.text;
  }
}

