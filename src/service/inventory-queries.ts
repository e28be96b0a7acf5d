// What InventoryService answers, independent of gRPC: the VMs vfiod can see with
// the state their hypervisors report, and the host's PCI endpoints with whether an
// Attach would pass now and who holds them.
import { VfiodError } from "../errors";
import type { BackendRegistry } from "../backends/registry";
import type { DeviceAllowList } from "../host/device-allow-list";
import type { HostPreflight } from "../host/preflight";
import { isEndpoint, listFunctions, readFunctionDetails, groupMembers, type HostFunctionDetails } from "../host/sysfs";
import { isVfioDriver } from "../host/preflight";
import type { VfioHolders } from "../host/vfio-holders";
import type { VmRecord, VmSource } from "../inventory/vm";
import { addressOfBdf } from "../pci/address";
import type { DeviceView } from "../view/device-view";
import type { Call } from "./call";
import type { HeldElsewhere } from "./held-elsewhere";

/** How long ListVms waits for one VM's state before reporting it unknown. */
export const VM_STATE_BOUND_MS = 1000;

export interface VmSummary {
  readonly id: string;
  readonly name: string;
  readonly hypervisor: string;
  readonly state: string;
  readonly source: VmSource;
}

export interface HostDeviceSummary {
  readonly bdf: string;
  readonly vendorId: string;
  readonly deviceId: string;
  readonly classCode: string;
  readonly driver: string;
  /** -1 without an IOMMU group. */
  readonly iommuGroup: number;
  readonly groupMembers: string[];
  readonly ready: boolean;
  readonly notReadyReason: string;
  readonly heldByVm: string;
  readonly heldByPid: number;
  readonly numaNode: number;
}

export interface InventoryQueriesDeps {
  readonly inventory: { all(): Promise<VmRecord[]>; records(): Promise<VmRecord[]> };
  readonly backends: BackendRegistry;
  readonly preflight: HostPreflight;
  readonly holders: VfioHolders;
  readonly heldElsewhere: HeldElsewhere;
  readonly view: DeviceView;
  readonly allowList?: DeviceAllowList;
  readonly sysfsRoot: string;
}

export class InventoryQueries {
  constructor(private readonly deps: InventoryQueriesDeps) {}

  /** Every VM, each asked for its state at once, none waited for beyond VM_STATE_BOUND_MS. */
  async listVms(call: Call): Promise<VmSummary[]> {
    const vms = await this.deps.inventory.all();
    return Promise.all(
      vms.map(async (vm) => ({
        id: vm.id,
        name: vm.name,
        hypervisor: vm.hypervisor,
        source: vm.source,
        state: await this.stateOf(vm, call.signal),
      })),
    );
  }

  private async stateOf(vm: VmRecord, signal: AbortSignal): Promise<string> {
    if (vm.notRunning !== undefined) return `not running: ${vm.notRunning}`;
    const bound = AbortSignal.timeout(VM_STATE_BOUND_MS);
    try {
      return await this.deps.backends.lister(vm.hypervisor).state(vm, AbortSignal.any([signal, bound]));
    } catch (err) {
      if (bound.aborted && !signal.aborted) return `unknown: no answer within ${VM_STATE_BOUND_MS / 1000} s`;
      const why = err instanceof Error ? err.message : String(err);
      if (err instanceof VfiodError && err.reason === "VM_NOT_RUNNING") return `not running: ${why}`;
      return `unreachable: ${why}`;
    }
  }

  /** The host's PCI endpoints (or those on a VFIO driver), each with readiness and holder. */
  async listHostDevices(request: { vfioOnly: boolean }, call: Call): Promise<HostDeviceSummary[]> {
    const { sysfsRoot } = this.deps;
    const functions = listFunctions(sysfsRoot).map((bdf) => readFunctionDetails(sysfsRoot, bdf));
    const shown = functions.filter(
      (fn) => isEndpoint(fn) && (!request.vfioOnly || (fn.driver !== undefined && isVfioDriver(fn.driver))),
    );
    // One /proc scan for every device.
    const index = this.deps.holders.canSeeOthers() ? await this.deps.holders.index(call.signal) : new Map<string, number[]>();
    const records = await this.deps.inventory.records();
    return Promise.all(shown.map((fn) => this.describe(fn, index, records)));
  }

  private async describe(
    fn: HostFunctionDetails,
    index: ReadonlyMap<string, number[]>,
    records: readonly VmRecord[],
  ): Promise<HostDeviceSummary> {
    const address = addressOfBdf(fn.bdf);
    const members = fn.group === undefined ? [] : groupMembers(this.deps.sysfsRoot, fn.group).filter((b) => b !== fn.bdf);
    const { nodes } = await this.deps.holders.nodesOf(address);
    const pid = nodes.flatMap((node) => index.get(node) ?? [])[0];
    const process = pid === undefined ? undefined : this.deps.heldElsewhere.identify(await this.deps.holders.process(pid), records);
    const known = [fn.bdf, ...members].flatMap((bdf) => this.deps.view.holdersOf(bdf))[0];
    const heldByVm = process?.vm?.id ?? known?.known.vm.id ?? "";
    let notReadyReason = "";
    try {
      await this.deps.allowList?.check(address);
      await this.deps.preflight.check(address);
      if (process !== undefined) {
        notReadyReason =
          process.vm === undefined
            ? `held open by process ${process.pid} (${process.command})`
            : `attached to VM ${process.vm.name} (pid ${process.pid})`;
      } else if (known !== undefined) {
        notReadyReason = `attached to VM ${known.known.vm.name} (device id ${known.device.id}, as vfiod last read it)`;
      }
    } catch (err) {
      if (!(err instanceof VfiodError)) throw err;
      notReadyReason = err.message;
    }
    return {
      bdf: fn.bdf,
      vendorId: fn.vendor,
      deviceId: fn.device,
      classCode: fn.pciClass === undefined ? "" : fn.pciClass.toString(16).padStart(6, "0"),
      driver: fn.driver ?? "",
      iommuGroup: fn.group === undefined || !/^\d+$/.test(fn.group) ? -1 : Number(fn.group),
      groupMembers: members,
      ready: notReadyReason === "",
      notReadyReason,
      heldByVm,
      heldByPid: pid ?? 0,
      numaNode: fn.numaNode,
    };
  }
}
