// Removals a backend requested that the guest has not finished, per hypervisor
// socket: device id -> host BDF. In memory only: hypervisors do not say which
// host device a pending removal holds, and a repeated removal is not harmless
// (CH v53 refuses it, QEMU native hot-plug calls the guest busy).
export class PendingRemovals {
  private readonly bySocket = new Map<string, Map<string, string>>();

  /** The pending removals of one VM, to read and update. */
  of(socket: string): Map<string, string> {
    let pending = this.bySocket.get(socket);
    if (pending === undefined) this.bySocket.set(socket, (pending = new Map()));
    return pending;
  }
}
