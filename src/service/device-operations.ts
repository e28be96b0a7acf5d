// What Attach, Detach and List do, independent of gRPC: validate the request,
// resolve the VM, pick its backend, check the host, serialize per VM, call the
// backend. Everything the caller may see is a VfiodError.
import type { AttachedDevice } from "../backends/backend";
import type { BackendRegistry } from "../backends/registry";
import { checkDeviceId, requireDeviceId } from "../device-id";
import { VfiodError } from "../errors";
import type { VmRecord } from "../inventory/vm";
import type { Logger } from "../log";
import { parsePciAddress, type PciAddress } from "../pci/address";
import type { VmLocks } from "./vm-locks";

export interface VmResolver {
  resolve(ref: string): Promise<VmRecord>;
}

export interface DeviceChecker {
  check(device: PciAddress): Promise<void>;
}

export interface DeviceOperationsDeps {
  readonly inventory: VmResolver;
  readonly backends: BackendRegistry;
  readonly host: DeviceChecker;
  readonly locks: VmLocks;
  /** How long Detach waits for the guest to release a device. */
  readonly detachTimeoutMs: number;
  readonly log: Logger;
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
   * @throws INVALID_ARGUMENT, VM_NOT_FOUND, VM_AMBIGUOUS, VM_NOT_RUNNING, BACKEND_UNSUPPORTED,
   *   DEVICE_NOT_FOUND, DEVICE_NOT_VFIO, IOMMU_GROUP_NOT_VIABLE, VM_BUSY, and the backend's reasons.
   */
  async attach(request: { vm: string; pci: string; id: string }, signal: AbortSignal): Promise<AttachedDevice> {
    const vmRef = requireVmRef(request.vm);
    const device = parsePciAddress(request.pci);
    const id = checkDeviceId(request.id);
    const vm = await this.deps.inventory.resolve(vmRef);
    refuseIfNotRunning(vm);
    const backend = this.deps.backends.get(vm.hypervisor);
    await this.deps.host.check(device);
    const attached = await this.deps.locks.run(vm.id, signal, () => backend.attach(vm, device, id, signal));
    this.deps.log.info({ vm: vm.id, device: device.bdf, id: attached.id }, "device attached");
    return attached;
  }

  /** @throws INVALID_ARGUMENT, VM_NOT_FOUND, VM_AMBIGUOUS, VM_NOT_RUNNING, VM_BUSY, and the backend's reasons. */
  async detach(request: { vm: string; id: string }, signal: AbortSignal): Promise<void> {
    const vmRef = requireVmRef(request.vm);
    const id = requireDeviceId(request.id);
    const vm = await this.deps.inventory.resolve(vmRef);
    refuseIfNotRunning(vm);
    const backend = this.deps.backends.get(vm.hypervisor);
    await this.deps.locks.run(vm.id, signal, () => backend.detach(vm, id, this.deps.detachTimeoutMs, signal));
    this.deps.log.info({ vm: vm.id, id }, "device detached");
  }

  /** A VM that is not running holds no devices (vfio attach is runtime-only). */
  async list(request: { vm: string }, signal: AbortSignal): Promise<AttachedDevice[]> {
    const vm = await this.deps.inventory.resolve(requireVmRef(request.vm));
    if (vm.notRunning !== undefined) return [];
    return this.deps.backends.get(vm.hypervisor).list(vm, signal);
  }
}
