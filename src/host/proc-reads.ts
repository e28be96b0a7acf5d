// Reads of /proc files that a process stuck in the kernel can block, made so that
// it cannot hold vfiod up. The kernel copies another process's arguments
// (/proc/<pid>/cmdline) out of its memory under that process's mmap lock, and lists
// a mount namespace (/proc/<pid>/mountinfo) under the namespace's lock: while a VMM
// is stuck holding the first (pinning a large guest's RAM for a VFIO device) or an
// unmount of a dead NFS server holds the second, the read blocks, and a libuv pool
// thread with it (the pool has 4, shared by every file read vfiod makes). So each
// file has one read at a time, shared by every caller that asks meanwhile: a stuck
// process ties up one thread, not the pool (FreshReads: a read waits for the one in
// flight, never beside it); and a caller stops waiting after a bound.
import fsp from "node:fs/promises";
import { FreshReads } from "../fresh-reads";

/** How long a caller waits: these files answer at once unless something is stuck. */
export const PROC_READ_WAIT_MS = 2000;

/** The read did not answer within the bound: something is stuck in the kernel. */
export class ProcReadStuck extends Error {}

const reads = new FreshReads<string>();

/**
 * The text of `file` (/proc/<pid>/cmdline, /proc/<pid>/mountinfo).
 * @throws the read's errno error (ENOENT: the process is gone); ProcReadStuck after `waitMs`.
 */
export async function readProcText(file: string, waitMs = PROC_READ_WAIT_MS): Promise<string> {
  const bound = AbortSignal.timeout(waitMs);
  try {
    return await reads.read(file, bound, `reading ${file}`, () => fsp.readFile(file, "utf8"));
  } catch (err) {
    if (bound.aborted) throw new ProcReadStuck(`${file}: no answer within ${waitMs / 1000} s`, { cause: err });
    throw err;
  }
}

/** The arguments in a /proc/<pid>/cmdline, split at NUL; throws as readProcText. */
export async function readCommandLine(file: string, waitMs = PROC_READ_WAIT_MS): Promise<string[]> {
  return (await readProcText(file, waitMs)).split("\0").filter((arg) => arg !== "");
}
