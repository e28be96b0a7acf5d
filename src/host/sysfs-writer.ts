// The one way vfiod changes the host: a write to a sysfs attribute. Managed
// binding (src/service/managed-binding.ts) is its only user, and every write goes
// through this interface, so tests record each one (and play the kernel's part on
// a fake tree) and can say "nothing was written". Facts:
// ../shared/reference/host-vfio-sysfs.md §5, ../shared/reference/binding-and-events.md §1.
import fs from "node:fs/promises";
import path from "node:path";
import { setTimeout as sleep } from "node:timers/promises";

export interface SysfsWriter {
  /**
   * Writes `value` to the attribute `file`, a host path such as
   * "/sys/bus/pci/drivers_probe" (as `echo -n value > file`).
   * @throws the kernel's refusal (an Error with its errno `code`), or a timeout.
   */
  write(file: string, value: string): Promise<void>;
}

/** One sysfs write bounded: an unbind can block in the kernel (a driver waiting for its users). */
export const SYSFS_WRITE_MS = 15_000;

/**
 * Writes under a root prefix ("/" on a real host): opened write-only and
 * truncating, never created (a missing attribute is an error, not a new file),
 * one write(2) per value.
 */
export class RootedSysfsWriter implements SysfsWriter {
  constructor(
    private readonly root: string,
    private readonly boundMs = SYSFS_WRITE_MS,
  ) {}

  async write(file: string, value: string): Promise<void> {
    const target = path.join(this.root, file);
    const bound = new AbortController();
    const write = (async () => {
      const handle = await fs.open(target, fs.constants.O_WRONLY | fs.constants.O_TRUNC);
      try {
        await handle.write(value);
      } finally {
        await handle.close();
      }
    })();
    // The thread doing a write the kernel blocks stays blocked; vfiod stops waiting for it.
    const timeout = sleep(this.boundMs, undefined, { signal: bound.signal }).then(() => {
      throw Object.assign(new Error(`writing ${JSON.stringify(value)} to ${file} did not complete within ${this.boundMs} ms`), {
        code: "ETIMEDOUT",
      });
    });
    try {
      await Promise.race([write, timeout]);
    } finally {
      bound.abort();
      timeout.catch(() => undefined);
    }
  }
}
