// Per-VM serialization of mutations: one Attach/Detach per VM at a time,
// different VMs in parallel (no global lock). A waiter whose call is cancelled
// or whose deadline passes gives up with ABORTED (VM_BUSY) and never takes the lock.
import { Mutex } from "async-mutex";
import { VfiodError } from "../errors";

interface Entry {
  readonly mutex: Mutex;
  /** Holders plus waiters; the entry is dropped at zero so the map stays small. */
  users: number;
}

export class VmLocks {
  private readonly entries = new Map<string, Entry>();

  /** Runs `fn` holding the VM's lock. @throws VM_BUSY when the signal aborts while waiting. */
  async run<T>(vmId: string, signal: AbortSignal, fn: () => Promise<T>): Promise<T> {
    const entry = this.enter(vmId);
    try {
      const release = await this.acquire(entry.mutex, vmId, signal);
      try {
        return await fn();
      } finally {
        release();
      }
    } finally {
      entry.users -= 1;
      if (entry.users === 0) this.entries.delete(vmId);
    }
  }

  private enter(vmId: string): Entry {
    let entry = this.entries.get(vmId);
    if (entry === undefined) {
      entry = { mutex: new Mutex(), users: 0 };
      this.entries.set(vmId, entry);
    }
    entry.users += 1;
    return entry;
  }

  private acquire(mutex: Mutex, vmId: string, signal: AbortSignal): Promise<() => void> {
    const busy = () =>
      new VfiodError("VM_BUSY", `another attach or detach of VM ${vmId} is in progress; retry later`, {
        meta: { vm: vmId },
      });
    if (signal.aborted) return Promise.reject(busy());
    return new Promise((resolve, reject) => {
      const onAbort = () => reject(busy());
      signal.addEventListener("abort", onAbort, { once: true });
      mutex.acquire().then((release) => {
        signal.removeEventListener("abort", onAbort);
        // Gave up while waiting: hand the lock straight on.
        if (signal.aborted) release();
        else resolve(release);
      });
    });
  }
}
