// What Attach, Detach and List do, independent of gRPC: validate the request,
// check the allow-list, resolve the VM, pick its backend, check the host, take
// the locks, call the backend, and keep vfiod's view of what each VM holds.
// Everything the caller may see is a VfiodError.
import type { AttachedDevice, DeviceAttacher } from "../backends/backend";
import type { BackendRegistry } from "../backends/registry";
import { checkDeviceId, companionId, requireDeviceId } from "../device-id";
import { Code, VfiodError } from "../errors";
import type { DeviceAllowList } from "../host/device-allow-list";
import type { IommuGroup, ManagedCheck } from "../host/preflight";
import { isEndpoint } from "../host/sysfs";
import type { VmRecord } from "../inventory/vm";
import type { KeyedLocks } from "../keyed-locks";
import { addressOfBdf, parsePciAddress, type PciAddress } from "../pci/address";
import type { DeviceView } from "../view/device-view";
import type { Call } from "./call";
import type { HeldElsewhere } from "./held-elsewhere";
import { groupLockKey, type BindPlan, type ManagedBinding } from "./managed-binding";
import { withOpsFlock } from "./ops-flock";

export interface VmDirectory {
  resolve(ref: string): Promise<VmRecord>;
}

export interface DeviceChecker {
  check(device: PciAddress, managed?: ManagedCheck): Promise<IommuGroup>;
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
  /** The longest a mutation waits for cocoon's ops.lock (--hypervisor-timeout). */
  readonly opsLockWaitMs: number;
  /** --allow-devices; undefined allows every device. */
  readonly allowList?: DeviceAllowList;
  /** --manage-binding; undefined: a managed Attach is BINDING_DISABLED. */
  readonly binding?: ManagedBinding;
}

/** A rollback's removal may wait this much beyond the detach timeout for its requests. */
const ROLLBACK_MARGIN_MS = 30_000;

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
   * Holds the IOMMU group's lock across "is it held elsewhere?" and the attach
   * itself, so two VMs racing for one device cannot both win; then the VM's lock.
   * With `wholeGroup`, every other endpoint of the group is checked before
   * anything is sent and attached after the device, all or nothing.
   * @throws INVALID_ARGUMENT, DEVICE_NOT_ALLOWED, VM_NOT_FOUND, VM_AMBIGUOUS,
   *   BACKEND_UNSUPPORTED, VM_NOT_RUNNING, DEVICE_NOT_FOUND, DEVICE_NOT_VFIO,
   *   IOMMU_GROUP_NOT_VIABLE, DEVICE_IN_USE, VM_BUSY, and the backend's reasons;
   *   with `managed`, BINDING_DISABLED and DEVICE_BUSY_ON_HOST too.
   */
  async attach(
    request: { vm: string; pci: string; id: string; wholeGroup?: boolean; managed?: boolean },
    call: Call,
  ): Promise<{ device: AttachedDevice; companions: AttachedDevice[] }> {
    const vmRef = requireVmRef(request.vm);
    const device = parsePciAddress(request.pci);
    const id = checkDeviceId(request.id);
    call.facts.device = device.bdf;
    if (id !== "") call.facts.id = id;
    const binding = request.managed === true ? this.requireBinding(device) : undefined;
    await this.deps.allowList?.check(device);
    const { vm, attacher } = await this.resolveAttacher(vmRef, "attach", call);
    const managed = binding === undefined ? undefined : { wholeGroup: request.wholeGroup === true };
    const group = await this.deps.host.check(device, managed);
    // Every companion passes the same checks before anything is sent.
    const companions = request.wholeGroup === true ? group.members.filter((m) => m.bdf !== device.bdf && isEndpoint(m)) : [];
    for (const member of companions) {
      await this.deps.allowList?.check(addressOfBdf(member.bdf));
      await this.deps.host.check(addressOfBdf(member.bdf), managed);
    }
    const busy = () =>
      new VfiodError("VM_BUSY", `another attach of host device ${device.bdf} or of its IOMMU group is in progress; retry later`, {
        meta: { device: device.bdf },
      });
    // A VM takes a whole IOMMU group (one opener per group node): attaches of any of its
    // members are serialized, so two VMs racing for two functions of one group have one winner.
    return this.deps.locks.run(groupLockKey(group.number), call.waitSignal, busy, async () => {
      await this.deps.heldElsewhere.refuse(vm, device, group, call.signal);
      // Managed: the host's use of every device to bind is checked before anything is written.
      const plan = await binding?.plan([device.bdf, ...companions.map((m) => m.bdf)], call.signal);
      return this.mutate(vm, call, () => this.withBinding(plan, vm, { bdf: device.bdf, id }, call, async () => {
        const before = companions.length === 0 ? [] : await this.deps.backends.lister(vm.hypervisor).list(vm, call.signal);
        const primary = await attacher.attach(vm, device, id, call.signal);
        call.facts.id = primary.id;
        this.deps.view.attached(vm, primary);
        const attached: AttachedDevice[] = [];
        for (const member of companions) {
          try {
            const companion = await attacher.attach(vm, addressOfBdf(member.bdf), companionId(primary.id, member.bdf), call.signal);
            this.deps.view.attached(vm, companion);
            attached.push(companion);
          } catch (err) {
            // All or nothing: what this call attached goes again; what was there before stays.
            const added = [primary, ...attached].filter((d) => !before.some((b) => b.id === d.id && b.bdf === d.bdf));
            throw await this.rollBack(vm, attacher, member.bdf, err, added.reverse());
          }
        }
        return { device: primary, companions: attached };
      }));
    });
  }

  /** BINDING_DISABLED unless vfiod runs with --manage-binding. */
  private requireBinding(device: PciAddress): ManagedBinding {
    if (this.deps.binding !== undefined) return this.deps.binding;
    throw new VfiodError(
      "BINDING_DISABLED",
      `managed attach of host PCI device ${device.bdf} asked for, but vfiod runs without --manage-binding: ` +
        "bind it to vfio-pci yourself and attach without managed, or run vfiod with --manage-binding and --allow-devices",
      { meta: { device: device.bdf } },
    );
  }

  /**
   * Managed: binds the planned devices just before `attach` runs, then records
   * them attached; if `attach` fails, puts their drivers back (the error says so).
   */
  private async withBinding<R extends { device: AttachedDevice; companions: AttachedDevice[] }>(
    plan: BindPlan | undefined,
    vm: VmRecord,
    primary: { bdf: string; id: string },
    call: Call,
    attach: () => Promise<R>,
  ): Promise<R> {
    if (plan === undefined) return attach();
    const bound = await plan.apply(vm, primary, call.log);
    try {
      const result = await attach();
      await bound.attached([result.device, ...result.companions], call.log);
      return result;
    } catch (err) {
      throw await bound.undo(err, call.log);
    }
  }

  /** Removes what a failed whole-group attach added; the error says what happened to each. */
  private async rollBack(
    vm: VmRecord,
    attacher: DeviceAttacher,
    failedBdf: string,
    cause: unknown,
    added: readonly AttachedDevice[],
  ): Promise<VfiodError> {
    const fates: string[] = [];
    for (const device of added) {
      // vfiod's own repair: it runs to its end whatever the caller does.
      const signal = AbortSignal.timeout(this.deps.detachTimeoutMs + ROLLBACK_MARGIN_MS);
      try {
        this.deps.view.detached(vm, await attacher.detach(vm, device.id, this.deps.detachTimeoutMs, signal));
        fates.push(`${device.id} (${device.bdf}) removed again`);
      } catch (err) {
        const pending = err instanceof VfiodError && err.reason === "DETACH_PENDING";
        fates.push(
          pending
            ? `${device.id} (${device.bdf}): removal requested, the guest has not released it yet`
            : `${device.id} (${device.bdf}) could not be removed: ${(err as Error).message}`,
        );
      }
    }
    const why = cause instanceof Error ? cause.message : String(cause);
    const undone = fates.length === 0 ? "nothing had been attached by this call" : fates.join("; ");
    const message = `whole-group attach to VM ${vm.name} failed at ${failedBdf}: ${why}; rolled back: ${undone}`;
    const meta = { vm: vm.id, failed: failedBdf, rolledBack: fates.join("; ") };
    return cause instanceof VfiodError
      ? new VfiodError(cause.reason, message, { code: cause.code, meta: { ...cause.meta, ...meta }, cause })
      : new VfiodError("HYPERVISOR_ERROR", message, { code: Code.INTERNAL, meta, cause });
  }

  /**
   * With `wholeGroup`, the companions a whole-group Attach added with `id`
   * (found by their derived ids) go first, then `id`.
   * @returns the device removed (its host BDF "" when the hypervisor no longer says).
   * @throws INVALID_ARGUMENT, VM_NOT_FOUND, VM_AMBIGUOUS, BACKEND_UNSUPPORTED, VM_NOT_RUNNING,
   *   VM_BUSY, and the backend's reasons (DETACH_PENDING names the device in its meta).
   */
  async detach(request: { vm: string; id: string; wholeGroup?: boolean }, call: Call): Promise<AttachedDevice> {
    const vmRef = requireVmRef(request.vm);
    const id = requireDeviceId(request.id);
    call.facts.id = id;
    const { vm, attacher } = await this.resolveAttacher(vmRef, "detach", call);
    // What the hypervisor released: a managed device gets its host driver back once the VM's lock is let go.
    const released: AttachedDevice[] = [];
    try {
      return await this.mutate(vm, call, async () => {
        if (request.wholeGroup === true) {
          const devices = await this.deps.backends.lister(vm.hypervisor).list(vm, call.signal);
          for (const companion of devices.filter((d) => d.id === companionId(id, d.bdf))) {
            released.push(await this.detachOne(vm, attacher, companion.id, call));
          }
        }
        const removed = await this.detachOne(vm, attacher, id, call);
        if (removed.bdf !== "") call.facts.device = removed.bdf;
        released.push(removed);
        return removed;
      });
    } catch (err) {
      if (err instanceof VfiodError && err.meta.device !== undefined) call.facts.device = err.meta.device;
      if (err instanceof VfiodError && err.reason === "DETACH_PENDING" && this.deps.binding !== undefined) {
        throw await this.deps.binding.pending(vm, err);
      }
      throw err;
    } finally {
      if (released.length > 0) await this.deps.binding?.released(vm, released, call.log);
    }
  }

  /** One removal, told to watchers as it goes: requested, then released or still pending. */
  private async detachOne(vm: VmRecord, attacher: DeviceAttacher, id: string, call: Call): Promise<AttachedDevice> {
    const { view } = this.deps;
    let requested: AttachedDevice | undefined;
    try {
      const removed = await attacher.detach(vm, id, this.deps.detachTimeoutMs, call.signal, (device) => {
        requested = device;
        view.announce({ kind: "detach_requested", vm, device, cause: "vfiod" });
      });
      view.detached(vm, removed);
      return removed;
    } catch (err) {
      if (requested !== undefined && err instanceof VfiodError && err.reason === "DETACH_PENDING") {
        view.announce({ kind: "detach_pending", vm, device: requested, cause: "vfiod", detail: err.message });
      }
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
      lockPath === undefined ? fn() : withOpsFlock(lockPath, vm.name, call.waitSignal, this.deps.opsLockWaitMs, fn),
    );
  }
}
