// What Attach, Detach and List do, independent of gRPC: validate the request,
// check the allow-list, resolve the VM, pick its backend, check the host, take
// the locks, call the backend. Everything the caller may see is a VfiodError.
import type { AttachedDevice, Backend } from "../backends/backend";
import type { BackendRegistry } from "../backends/registry";
import { checkDeviceId, requireDeviceId } from "../device-id";
import { VfiodError } from "../errors";
import type { DeviceAllowList } from "../host/device-allow-list";
import type { VmRecord } from "../inventory/vm";
import type { Logger } from "../log";
import { parsePciAddress, type PciAddress } from "../pci/address";
import type { KeyedLocks } from "../keyed-locks";
import { withOpsFlock } from "./ops-flock";

export interface VmDirectory {
  resolve(ref: string): Promise<VmRecord>;
  all(): Promise<VmRecord[]>;
}

export interface DeviceChecker {
  check(device: PciAddress): Promise<void>;
}

export interface DeviceOperationsDeps {
  readonly inventory: VmDirectory;
  readonly backends: BackendRegistry;
  readonly host: DeviceChecker;
  readonly locks: KeyedLocks;
  /** How long Detach waits for the guest to release a device. */
  readonly detachTimeoutMs: number;
  /** --allow-devices; undefined allows every device. */
  readonly allowList?: DeviceAllowList;
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
   * Holds the device's lock across "is it on another VM?" and the attach itself,
   * so two VMs racing for one device cannot both win; then the VM's lock.
   * @throws INVALID_ARGUMENT, DEVICE_NOT_ALLOWED, VM_NOT_FOUND, VM_AMBIGUOUS, VM_NOT_RUNNING,
   *   BACKEND_UNSUPPORTED, DEVICE_NOT_FOUND, DEVICE_NOT_VFIO, IOMMU_GROUP_NOT_VIABLE,
   *   DEVICE_IN_USE, VM_BUSY, and the backend's reasons.
   */
  async attach(request: { vm: string; pci: string; id: string }, signal: AbortSignal): Promise<AttachedDevice> {
    const vmRef = requireVmRef(request.vm);
    const device = parsePciAddress(request.pci);
    const id = checkDeviceId(request.id);
    await this.deps.allowList?.check(device);
    const vm = await this.deps.inventory.resolve(vmRef);
    refuseIfNotRunning(vm);
    const backend = this.deps.backends.get(vm.hypervisor);
    await this.deps.host.check(device);
    const busy = () =>
      new VfiodError("VM_BUSY", `another attach of host device ${device.bdf} is in progress; retry later`, {
        meta: { device: device.bdf },
      });
    return this.deps.locks.run(`device:${device.bdf}`, signal, busy, async () => {
      await this.refuseIfAttachedElsewhere(vm, device, signal);
      return this.mutate(vm, signal, () =>
        this.logOutcome("attach", { vm: vm.id, device: device.bdf, id }, signal, () => backend.attach(vm, device, id, signal)),
      );
    });
  }

  /** @throws INVALID_ARGUMENT, VM_NOT_FOUND, VM_AMBIGUOUS, VM_NOT_RUNNING, VM_BUSY, and the backend's reasons. */
  async detach(request: { vm: string; id: string }, signal: AbortSignal): Promise<void> {
    const vmRef = requireVmRef(request.vm);
    const id = requireDeviceId(request.id);
    const vm = await this.deps.inventory.resolve(vmRef);
    refuseIfNotRunning(vm);
    const backend = this.deps.backends.get(vm.hypervisor);
    await this.mutate(vm, signal, () =>
      this.logOutcome("detach", { vm: vm.id, id }, signal, () => backend.detach(vm, id, this.deps.detachTimeoutMs, signal)),
    );
  }

  /** A VM that is not running holds no devices (VFIO attach is runtime-only). */
  async list(request: { vm: string }, signal: AbortSignal): Promise<AttachedDevice[]> {
    const vm = await this.deps.inventory.resolve(requireVmRef(request.vm));
    if (vm.notRunning !== undefined) return [];
    return this.deps.backends.get(vm.hypervisor).list(vm, signal);
  }

  /**
   * Logs how a mutation ended. Backends finish reading a request they have sent
   * even when the caller gives up, so the log is where an outcome the caller
   * never saw (its deadline passed first) is told.
   */
  private async logOutcome<T extends { id: string } | void>(
    verb: "attach" | "detach",
    fields: Record<string, string>,
    signal: AbortSignal,
    fn: () => Promise<T>,
  ): Promise<T> {
    const callerGone = () => (signal.aborted ? { callerGaveUp: true } : {});
    try {
      const result = await fn();
      const id = result === undefined ? fields.id : result.id;
      this.deps.log.info({ ...fields, id, ...callerGone() }, verb === "attach" ? "device attached" : "device detached");
      return result;
    } catch (err) {
      const reason = err instanceof VfiodError ? err.reason : "INTERNAL";
      this.deps.log.warn({ ...fields, reason, err, ...callerGone() }, `device ${verb} failed`);
      throw err;
    }
  }

  /** One mutation of a VM at a time; a cocoon VM's ops flock too, so cocoon cannot race us. */
  private mutate<T>(vm: VmRecord, signal: AbortSignal, fn: () => Promise<T>): Promise<T> {
    const busy = () =>
      new VfiodError("VM_BUSY", `another attach or detach of VM ${vm.name} is in progress; retry later`, {
        meta: { vm: vm.id },
      });
    const lockPath = vm.opsLockPath;
    return this.deps.locks.run(`vm:${vm.id}`, signal, busy, () =>
      lockPath === undefined ? fn() : withOpsFlock(lockPath, vm.name, signal, fn),
    );
  }

  /**
   * Asks every other running VM vfiod can see whether it holds the device. A VM
   * that cannot answer is logged and skipped: the kernel still refuses a group
   * another process holds open (EBUSY).
   * @throws DEVICE_IN_USE naming the VM.
   */
  private async refuseIfAttachedElsewhere(target: VmRecord, device: PciAddress, signal: AbortSignal): Promise<void> {
    const others = (await this.deps.inventory.all()).filter((vm) => vm.id !== target.id && vm.notRunning === undefined);
    const checks = others.map(async (vm) => {
      let backend: Backend;
      try {
        backend = this.deps.backends.get(vm.hypervisor);
      } catch {
        return undefined;
      }
      const held = (await backend.list(vm, signal)).find((attached) => attached.bdf === device.bdf);
      return held === undefined ? undefined : { vm, held };
    });
    for (const [index, result] of (await Promise.allSettled(checks)).entries()) {
      if (result.status === "rejected") {
        this.deps.log.warn({ vm: others[index]?.id, err: result.reason }, "could not ask VM whether it holds a device");
      } else if (result.value !== undefined) {
        const { vm, held } = result.value;
        throw new VfiodError(
          "DEVICE_IN_USE",
          `host PCI device ${device.bdf} is attached to VM ${vm.name} (device id ${held.id}); detach it there first`,
          { meta: { device: device.bdf, vm: vm.id, id: held.id } },
        );
      }
    }
  }
}
