// cocoon serializes every mutating verb of a VM (attach, snapshot, stop, ...) on
// an exclusive flock of its ops.lock (../shared/reference/cocoon.md A.2). vfiod
// takes the same lock around its mutations of a cocoon VM so it never races a
// snapshot or a stop. A non-blocking flock is retried: a blocking one would pin
// a libuv thread and ignore the caller's deadline.
import { flock } from "fs-ext";
import fs from "node:fs/promises";
import { setTimeout as sleep } from "node:timers/promises";
import { VfiodError } from "../errors";

const flockNonBlocking = (fd: number) =>
  new Promise<void>((resolve, reject) => flock(fd, "exnb", (err) => (err ? reject(err) : resolve())));
const RETRY_MS = 25;

/**
 * Runs `fn` holding an exclusive flock on `lockPath` (created if missing, never deleted),
 * waiting for it until the signal aborts or, the caller's deadline or not, `maxWaitMs`:
 * the holder is another process (a cocoon snapshot or stop), which nothing of vfiod's bounds.
 * @throws VM_BUSY when the lock is not free in time.
 */
export async function withOpsFlock<T>(
  lockPath: string,
  vmName: string,
  signal: AbortSignal,
  maxWaitMs: number,
  fn: () => Promise<T>,
): Promise<T> {
  const file = await fs.open(lockPath, "a", 0o644);
  try {
    const giveUpAt = performance.now() + maxWaitMs;
    for (;;) {
      try {
        await flockNonBlocking(file.fd);
        break;
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== "EAGAIN" && (err as NodeJS.ErrnoException).code !== "EWOULDBLOCK") throw err;
      }
      if (signal.aborted || performance.now() >= giveUpAt) {
        throw new VfiodError("VM_BUSY", `VM ${vmName} is locked by another cocoon operation (snapshot, stop, ...); retry later`, {
          meta: { vm: vmName },
        });
      }
      await sleep(RETRY_MS);
    }
    return await fn();
  } finally {
    // Closing the descriptor releases the flock.
    await file.close();
  }
}
