// What Attach, Detach and List do, independent of gRPC: validate the request,
// check the allow-list, resolve the VM, pick its backend, check the host, take
// the locks, call the backend, and keep vfiod's view of what each VM holds.
// Everything the caller may see is a VfiodError.
import type { AttachedDevice, DeviceAttacher } from "../backends/backend";
import type { BackendRegistry } from "../backends/registry";
import { checkDeviceId, requireDeviceId } from "../device-id";
import { VfiodError } from "../errors";
import type { DeviceAllowList } from "../host/device-allow-list";
import type { IommuGroup } from "../host/preflight";
import type { VmRecord } from "../inventory/vm";
import type { KeyedLocks } from "../keyed-locks";
import { parsePciAddress, type PciAddress } from "../pci/address";
import type { DeviceView } from "../view/device-view";
import type { Call } from "./call";
import type { HeldElsewhere } from "./held-elsewhere";
import { withOpsFlock } from "./ops-flock";

export interface VmDirectory {
  resolve(ref: string): Promise<VmRecord>;
}

export interface DeviceChecker {
  check(device: PciAddress): Promise<IommuGroup>;
}

export interface DeviceOperationsDeps {
  readonly inventory: VmDirectory;
  readonly backends: BackendRegistry;
  readonly host: DeviceChecker;
  readonly heldElsewhere: HeldElsewhere;
  readonly view: DeviceView;
  readonly locks: KeyedLocks;
  /** How long Detach waits for the guest to release a device. */
  readonly detachTimeoutMs: number;
  /** --allow-devices; undefined allows every device. */
  readonly allowList?: DeviceAllowList;
}

function requireVmRef(vm: string): string {
  if (vm.trim() === "") throw new VfiodError("INVALID_ARGUMENT", "vm is required");
  return vm;
}

function refuseIfNotRunning(vm: VmRecord): void {
  if (vm.notRunning !== undefined) {
    throw new VfiodError("VM_NOT_RUNNING", `VM ${vm.name} is not running: ${vm.notRunning}`, { meta: { vm: vm.id } });
  }
}

export class DeviceOperations {
  constructor(private readonly deps: DeviceOperationsDeps) {}

  /**
   * Holds the device's lock across "is it held elsewhere?" and the attach itself,
   * so two VMs racing for one device cannot both win; then the VM's lock.
   * @throws INVALID_ARGUMENT, DEVICE_NOT_ALLOWED, VM_NOT_FOUND, VM_AMBIGUOUS,
   *   BACKEND_UNSUPPORTED, VM_NOT_RUNNING, DEVICE_NOT_FOUND, DEVICE_NOT_VFIO,
   *   IOMMU_GROUP_NOT_VIABLE, DEVICE_IN_USE, VM_BUSY, and the backend's reasons.
   */
  async attach(request: { vm: string; pci: string; id: string }, call: Call): Promise<AttachedDevice> {
    const vmRef = requireVmRef(request.vm);
    const device = parsePciAddress(request.pci);
    const id = checkDeviceId(request.id);
    call.facts.device = device.bdf;
    if (id !== "") call.facts.id = id;
    await this.deps.allowList?.check(device);
    const { vm, attacher } = await this.resolveAttacher(vmRef, "attach", call);
    const group = await this.deps.host.check(device);
    const busy = () =>
      new VfiodError("VM_BUSY", `another attach of host device ${device.bdf} or of its IOMMU group is in progress; retry later`, {
        meta: { device: device.bdf },
      });
    // A VM takes a whole IOMMU group (one opener per group node): attaches of any of its
    // members are serialized, so two VMs racing for two functions of one group have one winner.
    return this.deps.locks.run(`iommu-group:${group.number}`, call.waitSignal, busy, async () => {
      await this.deps.heldElsewhere.refuse(vm, device, group, call.signal);
      const attached = await this.mutate(vm, call, () => attacher.attach(vm, device, id, call.signal));
      call.facts.id = attached.id;
      this.deps.view.attached(vm, attached);
      return attached;
    });
  }

  /**
   * @returns the device removed (its host BDF "" when the hypervisor no longer says).
   * @throws INVALID_ARGUMENT, VM_NOT_FOUND, VM_AMBIGUOUS, BACKEND_UNSUPPORTED, VM_NOT_RUNNING,
   *   VM_BUSY, and the backend's reasons (DETACH_PENDING names the device in its meta).
   */
  async detach(request: { vm: string; id: string }, call: Call): Promise<AttachedDevice> {
    const vmRef = requireVmRef(request.vm);
    const id = requireDeviceId(request.id);
    call.facts.id = id;
    const { vm, attacher } = await this.resolveAttacher(vmRef, "detach", call);
    try {
      const removed = await this.mutate(vm, call, () =>
        attacher.detach(vm, id, this.deps.detachTimeoutMs, call.signal),
      );
      if (removed.bdf !== "") call.facts.device = removed.bdf;
      this.deps.view.detached(vm, removed);
      return removed;
    } catch (err) {
      if (err instanceof VfiodError && err.meta.device !== undefined) call.facts.device = err.meta.device;
      throw err;
    }
  }

  /** A VM that is not running holds no devices (VFIO attach is runtime-only). */
  async list(request: { vm: string }, call: Call): Promise<AttachedDevice[]> {
    const vm = await this.resolve(requireVmRef(request.vm), call);
    const devices = vm.notRunning !== undefined ? [] : await this.deps.backends.lister(vm.hypervisor).list(vm, call.signal);
    this.deps.view.observed(vm, devices);
    return devices;
  }

  private async resolve(vmRef: string, call: Call): Promise<VmRecord> {
    const vm = await this.deps.inventory.resolve(vmRef);
    call.facts.vm = vm.id;
    call.facts.vmName = vm.name;
    return vm;
  }

  /** The VM and its backend, refusing a backend that cannot hot-plug before anything else (cocoon's order). */
  private async resolveAttacher(
    vmRef: string,
    verb: "attach" | "detach",
    call: Call,
  ): Promise<{ vm: VmRecord; attacher: DeviceAttacher }> {
    const vm = await this.resolve(vmRef, call);
    const attacher = this.deps.backends.attacher(vm.hypervisor, verb);
    refuseIfNotRunning(vm);
    return { vm, attacher };
  }

  /** One mutation of a VM at a time; a cocoon VM's ops flock too, so cocoon cannot race us. */
  private mutate<T>(vm: VmRecord, call: Call, fn: () => Promise<T>): Promise<T> {
    const busy = () =>
      new VfiodError("VM_BUSY", `another attach or detach of VM ${vm.name} is in progress; retry later`, {
        meta: { vm: vm.id },
      });
    const lockPath = vm.opsLockPath;
    return this.deps.locks.run(`vm:${vm.id}`, call.waitSignal, busy, () =>
      lockPath === undefined ? fn() : withOpsFlock(lockPath, vm.name, call.waitSignal, fn),
    );
  }
}
