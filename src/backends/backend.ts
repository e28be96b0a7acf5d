// The one narrow seam between vfiod's service logic and a hypervisor (cocoon's
// Lister and Attacher roles, ../shared/style.md). Backends know nothing of gRPC;
// they throw VfiodError (src/errors.ts).
import type { VmRecord } from "../inventory/vm";
import type { PciAddress } from "../pci/address";

/** One VFIO device as a VM holds it (mirrors vfiod.v1.Device). */
export interface AttachedDevice {
  /** Hypervisor device id. */
  readonly id: string;
  /** Host BDF, full form; "" when the hypervisor names a path vfiod cannot read. */
  readonly bdf: string;
  /** Canonical host sysfs path; "" when unknown. */
  readonly path: string;
  /** Guest address, when the hypervisor reports it; else "". */
  readonly guestBdf: string;
}

/** Every backend can say what state a VM is in and what it holds (a hypervisor without VFIO holds nothing). */
export interface DeviceLister {
  /**
   * The VM's state in the hypervisor's own words ("Running", "running", "Paused").
   * @throws VM_NOT_RUNNING (no VM in the hypervisor), HYPERVISOR_ERROR, HYPERVISOR_UNAVAILABLE
   */
  state(vm: VmRecord, signal: AbortSignal): Promise<string>;

  /**
   * The VFIO devices the VM holds now, read from the live hypervisor, in its
   * order; a device whose removal is pending is still held. Concurrent calls for
   * one VM may share one read, but never one sent before the call began.
   * @throws HYPERVISOR_ERROR, HYPERVISOR_UNAVAILABLE
   */
  list(vm: VmRecord, signal: AbortSignal): Promise<AttachedDevice[]>;

  /** Callers waiting for a hypervisor socket now, beyond those it is serving: [socket, waiting]. */
  queues(): [string, number][];
}

/**
 * A hypervisor that can hot-plug VFIO devices.
 *
 * Callers have already validated the PCI address and id, resolved the VM, run
 * host preflight and checked that no other VM or process holds the device; they
 * serialize mutations per VM. Every method honours the signal: once it aborts,
 * nothing new is sent to the hypervisor. A mutating request already sent is
 * awaited to its outcome, bounded by vfiod's own limit (sent-request.ts), so the
 * caller's lock covers what really happened.
 */
export interface DeviceAttacher {
  /**
   * Hot-plugs `device` into the running VM under `id` ("" lets the backend choose).
   * Sends the hypervisor's add request at most once (it is not idempotent).
   * Returns the existing device, sending nothing, when the same id already holds
   * the same device.
   * @throws VM_NOT_RUNNING, VM_PAUSED, ID_IN_USE, DEVICE_ALREADY_ATTACHED,
   *   NO_FREE_SLOT, HYPERVISOR_ERROR, HYPERVISOR_UNAVAILABLE
   */
  attach(vm: VmRecord, device: PciAddress, id: string, signal: AbortSignal): Promise<AttachedDevice>;

  /**
   * Removes device `id` and waits, at most `waitMs` and within the signal, for
   * the guest to release it. A removal vfiod requested earlier is never asked
   * for again, only awaited; once it has completed, Detach of its id answers OK.
   * `requested` is told once the removal stands requested, before the wait.
   * @returns the device that was removed (its bdf "" when the hypervisor no longer says).
   * @throws DEVICE_NOT_ATTACHED, DETACH_PENDING (meta names the device), VM_NOT_RUNNING,
   *   VM_PAUSED, HYPERVISOR_ERROR, HYPERVISOR_UNAVAILABLE
   */
  detach(
    vm: VmRecord,
    id: string,
    waitMs: number,
    signal: AbortSignal,
    requested?: (device: AttachedDevice) => void,
  ): Promise<AttachedDevice>;
}

/** A backend lists; one that can hot-plug VFIO also attaches (Firecracker cannot). */
export type Backend = DeviceLister & Partial<DeviceAttacher>;

export function canAttach(backend: Backend): backend is DeviceLister & DeviceAttacher {
  return typeof backend.attach === "function" && typeof backend.detach === "function";
}
