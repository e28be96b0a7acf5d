// Reads of kernel files that something stuck can block, made so that it cannot
// hold vfiod up. The kernel copies another process's arguments (/proc/<pid>/cmdline)
// out of its memory under that process's mmap lock; lists a mount namespace
// (/proc/<pid>/mountinfo) under the namespace's lock; and shows some PCI attributes
// (sriov_numvfs, a device's uevent) under the device's lock, which its driver holds
// while it probes or unbinds. While a VMM is stuck holding the first (pinning a large
// guest's RAM for a VFIO device), an unmount of a dead NFS server the second, or a
// driver hangs in its remove, the read blocks, and a libuv pool thread with it (the
// pool has 4, shared by every file read vfiod makes). So each file has one read at a
// time, shared by every caller that asks meanwhile: a stuck read ties up one thread,
// not the pool (FreshReads: a read waits for the one in flight, never beside it);
// and a caller stops waiting after a bound. Never read such a file synchronously: that
// would stop the event loop, and every call with it.
import fsp from "node:fs/promises";
import { FreshReads } from "../fresh-reads";

/** How long a caller waits: these files answer at once unless something is stuck. */
export const KERNEL_READ_WAIT_MS = 2000;

/** The read did not answer within the bound: something holds the kernel's lock. */
export class KernelReadStuck extends Error {}

const reads = new FreshReads<string>();

/**
 * The text of `file` (/proc/<pid>/cmdline, /proc/<pid>/mountinfo, a PCI device's sriov_numvfs).
 * @throws the read's errno error (ENOENT: the process is gone); KernelReadStuck after `waitMs`.
 */
export async function readKernelText(file: string, waitMs = KERNEL_READ_WAIT_MS): Promise<string> {
  const bound = AbortSignal.timeout(waitMs);
  try {
    return await reads.read(file, bound, `reading ${file}`, () => fsp.readFile(file, "utf8"));
  } catch (err) {
    if (bound.aborted) throw new KernelReadStuck(`${file}: no answer within ${waitMs / 1000} s`, { cause: err });
    throw err;
  }
}

/** The arguments in a /proc/<pid>/cmdline, split at NUL; throws as readKernelText. */
export async function readCommandLine(file: string, waitMs = KERNEL_READ_WAIT_MS): Promise<string[]> {
  return (await readKernelText(file, waitMs)).split("\0").filter((arg) => arg !== "");
}
