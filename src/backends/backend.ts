// The one narrow seam between vfiod's service logic and a hypervisor.
// Backends know nothing of gRPC; they throw VfiodError (src/errors.ts).
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

/**
 * A hypervisor that can hot-plug VFIO devices.
 *
 * Callers have already validated the PCI address and id, resolved the VM and run
 * host preflight; callers serialize mutations per VM. Every method honours the
 * signal: once it aborts, nothing new is sent to the hypervisor. A mutating
 * request already sent is awaited to its outcome, bounded by vfiod's own limit
 * (src/backends/sent-request.ts), so the caller's lock covers what really happened.
 */
export interface Backend {
  /**
   * Hot-plugs `device` into the running VM under `id` ("" lets the backend choose).
   * Sends the hypervisor's add request at most once (it is not idempotent).
   * Returns the existing device, sending nothing, when the same id already holds
   * the same device.
   * @throws VM_NOT_RUNNING, VM_PAUSED, ID_IN_USE, DEVICE_ALREADY_ATTACHED,
   *   NO_FREE_SLOT, HYPERVISOR_ERROR, HYPERVISOR_UNAVAILABLE, BACKEND_UNSUPPORTED
   */
  attach(vm: VmRecord, device: PciAddress, id: string, signal: AbortSignal): Promise<AttachedDevice>;

  /**
   * Removes device `id` and waits, at most `waitMs` and within the signal, for
   * the guest to release it.
   * @throws DEVICE_NOT_ATTACHED, DETACH_PENDING, VM_NOT_RUNNING, VM_PAUSED,
   *   HYPERVISOR_ERROR, HYPERVISOR_UNAVAILABLE, BACKEND_UNSUPPORTED
   */
  detach(vm: VmRecord, id: string, waitMs: number, signal: AbortSignal): Promise<void>;

  /**
   * The VFIO devices the VM holds now, read from the live hypervisor.
   * @throws HYPERVISOR_ERROR, HYPERVISOR_UNAVAILABLE
   */
  list(vm: VmRecord, signal: AbortSignal): Promise<AttachedDevice[]>;
}
