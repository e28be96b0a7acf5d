// Removals a backend requested, per VM (hypervisor socket): id -> host BDF, while
// the guest has not released the device (pending), and for a while after it did
// (completed). In memory only: hypervisors do not say which host device a pending
// removal holds, and a repeated removal is not harmless (CH v53 refuses it, QEMU
// native hot-plug calls the guest busy), so a later Detach only waits; once the
// removal completed, a control plane's retried Detach answers OK.
//
// Completed removals are remembered per VM up to a bound, oldest forgotten first;
// an id attached again is forgotten at once.

/** Completed removals kept per VM: enough for any retry loop, small for 100 VMs. */
const COMPLETED_PER_VM = 64;

interface VmRemovals {
  readonly pending: Map<string, string>;
  readonly completed: Map<string, string>;
}

export class RemovalLedger {
  private readonly bySocket = new Map<string, VmRemovals>();

  /** The removal of `id` (holding host `bdf`, "" if unknown) was requested and not finished. */
  requested(socket: string, id: string, bdf: string): void {
    const vm = this.of(socket);
    vm.completed.delete(id);
    vm.pending.set(id, bdf);
  }

  /** The host BDF of a pending removal of `id`, or undefined when none is pending. */
  pending(socket: string, id: string): string | undefined {
    return this.bySocket.get(socket)?.pending.get(id);
  }

  /** Pending removals of one VM: [id, bdf]. */
  pendingOf(socket: string): [string, string][] {
    return [...(this.bySocket.get(socket)?.pending ?? [])];
  }

  /** The guest released `id`: its removal completed (a no-op unless vfiod requested it). */
  completed(socket: string, id: string): void {
    const vm = this.bySocket.get(socket);
    const bdf = vm?.pending.get(id);
    if (vm === undefined || bdf === undefined) return;
    vm.pending.delete(id);
    vm.completed.set(id, bdf);
    for (const oldest of vm.completed.keys()) {
      if (vm.completed.size <= COMPLETED_PER_VM) break;
      vm.completed.delete(oldest);
    }
  }

  /** The host BDF a completed removal of `id` released, or undefined. */
  removed(socket: string, id: string): string | undefined {
    return this.bySocket.get(socket)?.completed.get(id);
  }

  /** `id` was attached again: a Detach of it is about the new device. */
  reused(socket: string, id: string): void {
    const vm = this.bySocket.get(socket);
    vm?.completed.delete(id);
    vm?.pending.delete(id);
    if (vm !== undefined && vm.pending.size === 0 && vm.completed.size === 0) this.bySocket.delete(socket);
  }

  private of(socket: string): VmRemovals {
    let vm = this.bySocket.get(socket);
    if (vm === undefined) this.bySocket.set(socket, (vm = { pending: new Map(), completed: new Map() }));
    return vm;
  }
}
