// "Is this host device held by anything other than the VM it is for?" answered
// without asking every VM: first the kernel (which process has the device's VFIO
// group or cdev open, mapped to a VM by the socket its command line names), then
// what vfiod knows each VM holds (a device configured but not opened yet). The
// cost does not grow with the number of VMs: no hypervisor is asked.
import { VfiodError } from "../errors";
import { commandLineOf, type HolderProcess, type VfioHolders } from "../host/vfio-holders";
import { commandLineNamesSocket } from "../inventory/command-line";
import type { VmRecord } from "../inventory/vm";
import type { IommuGroup } from "../host/preflight";
import type { PciAddress } from "../pci/address";
import { sameVm, type DeviceView } from "../view/device-view";

/** Who holds a device, as far as vfiod can tell. */
export interface Holder {
  /** The VM, when the holder is one vfiod can see. */
  readonly vm?: VmRecord;
  /** The holding process, when the kernel says (0 when only vfiod's knowledge does). */
  readonly pid: number;
  readonly command: string;
  /** The device id in that VM, when vfiod knows it. */
  readonly id?: string;
  /** When vfiod last learnt it, for knowledge rather than the kernel's word (ms since epoch). */
  readonly knownAt?: number;
  /** The process's arguments could not be read (it may be stuck in the kernel), so no VM could be matched. */
  readonly argsUnread?: true;
}

export interface HeldElsewhereDeps {
  /** The kernel's view; undefined or unable to read other processes: vfiod's knowledge only. */
  readonly kernel: VfioHolders | undefined;
  readonly view: DeviceView;
  /** Every VM record vfiod can see, without liveness checks (cheap). */
  readonly records: () => Promise<readonly VmRecord[]>;
}

export class HeldElsewhere {
  constructor(private readonly deps: HeldElsewhereDeps) {}

  /**
   * Refuses a device held by another VM or by a process that is no VM vfiod knows.
   * Call it holding the device's lock, so two attaches of one device have one winner.
   * @throws DEVICE_IN_USE (FAILED_PRECONDITION) naming the VM, or the process (pid and command).
   */
  async refuse(target: VmRecord, device: PciAddress, group: IommuGroup, signal: AbortSignal): Promise<void> {
    const holder = (await this.kernelHolders(device, signal)).find((h) => h.vm === undefined || !sameVm(h.vm, target));
    if (holder !== undefined) {
      // The kernel names the process; vfiod's view may know which device of the group that VM has, and its id.
      const inGroup = (bdf: string) => group.members.some((member) => member.bdf === bdf);
      const known = holder.vm === undefined ? undefined : this.deps.view.get(holder.vm)?.devices.find((d) => inGroup(d.bdf));
      throw inUse(device, known === undefined ? holder : { ...holder, id: known.id }, known?.bdf);
    }
    // A device of the group configured in another VM that has not opened it yet (a created, not booted VM).
    for (const member of group.members) {
      const [known] = this.deps.view.holdersOf(member.bdf, target);
      if (known === undefined) continue;
      throw inUse(device, { vm: known.known.vm, pid: 0, command: "", id: known.device.id, knownAt: known.known.knownAt }, member.bdf);
    }
  }

  /** The processes holding the device's VFIO nodes now, each with its VM when it is one. */
  async kernelHolders(device: PciAddress, signal: AbortSignal): Promise<Holder[]> {
    const kernel = this.deps.kernel;
    if (kernel === undefined || !kernel.canSeeOthers()) return [];
    const { nodes } = await kernel.nodesOf(device);
    const processes = await kernel.holders(nodes, signal);
    if (processes.length === 0) return [];
    const records = await this.deps.records();
    return processes.map((process) => this.identify(process, records));
  }

  /** The VM whose control socket the process's command line names, if any. */
  identify(process: HolderProcess, records: readonly VmRecord[]): Holder {
    const vm = records.find((record) => commandLineNamesSocket(process.args, record.socket));
    const unread = process.args.length === 0 ? { argsUnread: true as const } : {};
    return { pid: process.pid, command: commandLineOf(process), ...unread, ...(vm === undefined ? {} : { vm }) };
  }
}

/** DEVICE_IN_USE naming the holder; `heldBdf` when what is held is another function of the device's IOMMU group. */
function inUse(device: PciAddress, holder: Holder, heldBdf = device.bdf): VfiodError {
  const meta: Record<string, string> = { device: device.bdf };
  if (holder.pid !== 0) meta.pid = String(holder.pid);
  if (holder.id !== undefined) meta.id = holder.id;
  if (holder.vm !== undefined) {
    meta.vm = holder.vm.id;
    const how =
      holder.pid !== 0
        ? `${holder.id === undefined ? "" : `device id ${holder.id}; `}its hypervisor (pid ${holder.pid}) holds the IOMMU group open`
        : `device id ${holder.id ?? "?"}, as vfiod last read the VM ${ago(holder.knownAt ?? 0)}`;
    const what =
      heldBdf === device.bdf
        ? `host PCI device ${device.bdf} is attached to VM ${holder.vm.name}`
        : `host PCI device ${heldBdf}, in the same IOMMU group as ${device.bdf}, is attached to VM ${holder.vm.name}`;
    return new VfiodError("DEVICE_IN_USE", `${what} (${how}); detach it there first`, { meta });
  }
  const who =
    holder.argsUnread === true
      ? "whose command line vfiod cannot read now (a process stuck in the kernel), so it cannot tell which VM it may be"
      : "which is no VM vfiod knows";
  return new VfiodError(
    "DEVICE_IN_USE",
    `host PCI device ${device.bdf} is held open by process ${holder.pid} (${holder.command}), ${who}; ` +
      "stop it or let it release the device first",
    { meta: { ...meta, command: holder.command } },
  );
}

function ago(at: number): string {
  const seconds = Math.max(0, Math.round((Date.now() - at) / 1000));
  return seconds === 0 ? "just now" : `${seconds} s ago`;
}
