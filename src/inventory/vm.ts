// What vfiod knows about a VM: enough to pick a backend and reach its hypervisor.

/** Hypervisor types a VM can name; a backend registers under one of them. */
export type HypervisorKind = string;

/** Where a VM record came from, for messages and ListVms. */
export type VmSource = "inventory" | "cocoon";

/** A VM as an inventory source describes it. Read-only. */
export interface VmRecord {
  /** Stable id (the inventory's `id`, else its name; cocoon's 26-character id). */
  readonly id: string;
  /** Human name; may equal the id. */
  readonly name: string;
  /** Hypervisor type, e.g. "cloud-hypervisor", "qemu", "firecracker". */
  readonly hypervisor: HypervisorKind;
  /** The hypervisor's control socket: CH/Firecracker API socket, QEMU QMP socket. */
  readonly socket: string;
  readonly source: VmSource;
  /**
   * Set when the source gave no id and `id` is the name (a static inventory entry
   * without "id"). Names are never prefix-matched, so neither is such an id.
   */
  readonly idIsName?: true;
  /**
   * Set when the source itself knows the VM cannot be reached (cocoon: state is
   * not "running", or its pid file and /proc do not match); the message says why.
   */
  readonly notRunning?: string;
  /** cocoon's per-VM ops lock file, held around mutations (issue 5). */
  readonly opsLockPath?: string;
}
