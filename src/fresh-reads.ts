// Concurrent reads of one thing (a VM's state, the host's VFIO holders) share one
// request, but a caller only ever joins a read sent after it arrived: the answer
// is never older than the call (Go's singleflight, made fresh). At most one read
// per key runs at a time, with at most one more queued behind it, so 200 callers
// cost two reads, not 200, and every one of them sees the state after it asked.
import { abortedError } from "./errors";

interface Slot<T> {
  running?: Promise<T>;
  /** Starts when `running` settles; every caller arriving before then joins it. */
  queued?: Promise<T>;
}

export class FreshReads<T> {
  private readonly slots = new Map<string, Slot<T>>();

  /**
   * The result of a read of `key` sent after this call began. `read` runs
   * without the caller's signal (other callers may share it) and must bound
   * itself; the caller stops waiting when its own signal aborts.
   * @throws what the read throws; abortedError(signal, what) when the caller gives up.
   */
  read(key: string, signal: AbortSignal, what: string, read: () => Promise<T>): Promise<T> {
    if (signal.aborted) return Promise.reject(abortedError(signal, what));
    let slot = this.slots.get(key);
    if (slot === undefined) this.slots.set(key, (slot = {}));
    let shared: Promise<T>;
    if (slot.queued !== undefined) {
      shared = slot.queued;
    } else if (slot.running !== undefined) {
      const owner = slot;
      const next = () => this.start(key, owner, read);
      shared = owner.queued = slot.running.then(next, next);
    } else {
      shared = this.start(key, slot, read);
    }
    return untilAborted(shared, signal, what);
  }

  private start(key: string, slot: Slot<T>, read: () => Promise<T>): Promise<T> {
    slot.queued = undefined;
    const running = read();
    slot.running = running;
    const settled = (): void => {
      if (slot.running === running) slot.running = undefined;
      if (slot.running === undefined && slot.queued === undefined) this.slots.delete(key);
    };
    running.then(settled, settled);
    return running;
  }
}

/** `promise`, or abortedError once `signal` aborts first. */
export function untilAborted<T>(promise: Promise<T>, signal: AbortSignal, what: string): Promise<T> {
  if (signal.aborted) return Promise.reject(abortedError(signal, what));
  return new Promise<T>((resolve, reject) => {
    const onAbort = () => reject(abortedError(signal, what));
    signal.addEventListener("abort", onAbort, { once: true });
    promise.then(
      (value) => {
        signal.removeEventListener("abort", onAbort);
        resolve(value);
      },
      (err: unknown) => {
        signal.removeEventListener("abort", onAbort);
        reject(err);
      },
    );
  });
}
