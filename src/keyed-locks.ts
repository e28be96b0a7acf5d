// Named in-process locks: at most `capacity` holders per key at a time (1: a
// mutex), different keys in parallel (no global lock). vfiod keys them by VM
// (mutations of one VM run one at a time), by host device (one device goes to
// one VM), by QMP socket (QEMU serves one monitor client) and by Cloud Hypervisor
// socket (a few connections each). Waiters are served in arrival order; one whose
// call is cancelled or whose deadline passes gives up and never takes the lock.
import { Semaphore } from "async-mutex";

interface Entry {
  readonly semaphore: Semaphore;
  /** Holders plus waiters; the entry is dropped at zero so the map stays small. */
  users: number;
}

export class KeyedLocks {
  private readonly entries = new Map<string, Entry>();

  constructor(private readonly capacity = 1) {}

  /**
   * Runs `fn` holding one of the `capacity` places of `key`.
   * @throws whatever `busy()` returns when the signal aborts while waiting.
   */
  async run<T>(key: string, signal: AbortSignal, busy: () => Error, fn: () => Promise<T>): Promise<T> {
    const entry = this.enter(key);
    try {
      const release = await acquire(entry.semaphore, signal, busy);
      try {
        return await fn();
      } finally {
        release();
      }
    } finally {
      entry.users -= 1;
      if (entry.users === 0) this.entries.delete(key);
    }
  }

  /** Callers waiting for `key` beyond those holding it. */
  waiting(key: string): number {
    return Math.max(0, (this.entries.get(key)?.users ?? 0) - this.capacity);
  }

  /** Every key with callers waiting: [key, waiting]. */
  queues(): [string, number][] {
    return [...this.entries.keys()].map((key): [string, number] => [key, this.waiting(key)]).filter(([, n]) => n > 0);
  }

  private enter(key: string): Entry {
    let entry = this.entries.get(key);
    if (entry === undefined) {
      entry = { semaphore: new Semaphore(this.capacity), users: 0 };
      this.entries.set(key, entry);
    }
    entry.users += 1;
    return entry;
  }
}

function acquire(semaphore: Semaphore, signal: AbortSignal, busy: () => Error): Promise<() => void> {
  if (signal.aborted) return Promise.reject(busy());
  return new Promise((resolve, reject) => {
    const onAbort = () => reject(busy());
    signal.addEventListener("abort", onAbort, { once: true });
    void semaphore.acquire().then(([, release]) => {
      signal.removeEventListener("abort", onAbort);
      // Gave up while waiting: hand the place straight on.
      if (signal.aborted) release();
      else resolve(release);
    });
  });
}
