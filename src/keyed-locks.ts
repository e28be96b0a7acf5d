// Named in-process locks: one holder per key at a time, different keys in
// parallel (no global lock). vfiod keys them by VM (mutations of one VM run one
// at a time) and by host device (one device goes to one VM). A waiter whose call
// is cancelled or whose deadline passes gives up and never takes the lock.
import { Mutex } from "async-mutex";

interface Entry {
  readonly mutex: Mutex;
  /** Holders plus waiters; the entry is dropped at zero so the map stays small. */
  users: number;
}

export class KeyedLocks {
  private readonly entries = new Map<string, Entry>();

  /**
   * Runs `fn` holding the lock of `key`.
   * @throws whatever `busy()` returns when the signal aborts while waiting.
   */
  async run<T>(key: string, signal: AbortSignal, busy: () => Error, fn: () => Promise<T>): Promise<T> {
    const entry = this.enter(key);
    try {
      const release = await acquire(entry.mutex, signal, busy);
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

  /** Keys held or waited for now (for tests and metrics). */
  size(): number {
    return this.entries.size;
  }

  private enter(key: string): Entry {
    let entry = this.entries.get(key);
    if (entry === undefined) {
      entry = { mutex: new Mutex(), users: 0 };
      this.entries.set(key, entry);
    }
    entry.users += 1;
    return entry;
  }
}

function acquire(mutex: Mutex, signal: AbortSignal, busy: () => Error): Promise<() => void> {
  if (signal.aborted) return Promise.reject(busy());
  return new Promise((resolve, reject) => {
    const onAbort = () => reject(busy());
    signal.addEventListener("abort", onAbort, { once: true });
    void mutex.acquire().then((release) => {
      signal.removeEventListener("abort", onAbort);
      // Gave up while waiting: hand the lock straight on.
      if (signal.aborted) release();
      else resolve(release);
    });
  });
}
