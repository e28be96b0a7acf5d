// --allow-devices: which host PCI devices vfiod may hand to a VM at all.
// Entries are vendor:device in hex with "*" wildcards ("10de:*", "8086:10d3")
// or a BDF ("0000:01:00.0", "01:00.0"). Checked before preflight and before any
// hypervisor is asked; a BDF-only list never reads sysfs.
import fs from "node:fs/promises";
import path from "node:path";
import { VfiodError } from "../errors";
import { parsePciAddress, type PciAddress } from "../pci/address";
import { pciDevicesDir } from "./sysfs";

interface IdRule {
  readonly vendor: string;
  readonly device: string;
}

const ID_RULE = /^([0-9a-f]{4}|\*):([0-9a-f]{4}|\*)$/;

export class DeviceAllowList {
  private constructor(
    private readonly bdfs: ReadonlySet<string>,
    private readonly ids: readonly IdRule[],
    private readonly sysfsRoot: string,
  ) {}

  /** @throws Error naming the bad entry (a usage error at start). */
  static parse(list: string, sysfsRoot: string): DeviceAllowList {
    const bdfs = new Set<string>();
    const ids: IdRule[] = [];
    for (const raw of list.split(",")) {
      const entry = raw.trim().toLowerCase();
      if (entry === "") continue;
      const id = ID_RULE.exec(entry);
      if (id !== null) {
        ids.push({ vendor: id[1]!, device: id[2]! });
        continue;
      }
      try {
        bdfs.add(parsePciAddress(entry).bdf);
      } catch {
        throw new Error(`--allow-devices: ${JSON.stringify(raw)} is neither vendor:device (hex, * wildcard) nor a BDF`);
      }
    }
    if (bdfs.size === 0 && ids.length === 0) throw new Error("--allow-devices: the list is empty");
    return new DeviceAllowList(bdfs, ids, sysfsRoot);
  }

  /** Whether the list lets every device through (an entry "*:*"). */
  allowsAnyDevice(): boolean {
    return this.ids.some((rule) => rule.vendor === "*" && rule.device === "*");
  }

  /** @throws DEVICE_NOT_ALLOWED (PERMISSION_DENIED). */
  async check(device: PciAddress): Promise<void> {
    if (this.bdfs.has(device.bdf)) return;
    const refuse = (why: string) =>
      new VfiodError("DEVICE_NOT_ALLOWED", `host PCI device ${device.bdf} is not in vfiod's --allow-devices list${why}`, {
        meta: { device: device.bdf },
      });
    if (this.ids.length === 0) throw refuse("");
    const id = await this.readId(device);
    if (id === undefined) throw refuse(" (its vendor:device cannot be read)");
    const allowed = this.ids.some(
      (rule) => (rule.vendor === "*" || rule.vendor === id.vendor) && (rule.device === "*" || rule.device === id.device),
    );
    if (!allowed) throw refuse(` (${id.vendor}:${id.device})`);
  }

  private async readId(device: PciAddress): Promise<IdRule | undefined> {
    const dir = path.join(pciDevicesDir(this.sysfsRoot), device.bdf);
    // The kernel writes "0x10de\n"; a rule holds 4 lower-case hex digits.
    const read = async (file: string) =>
      (await fs.readFile(path.join(dir, file), "utf8")).trim().toLowerCase().replace(/^0x/, "").padStart(4, "0");
    return Promise.all([read("vendor"), read("device")]).then(
      ([vendor, dev]) => ({ vendor, device: dev }),
      () => undefined,
    );
  }
}
