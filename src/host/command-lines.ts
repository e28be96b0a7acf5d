// A process's command line (/proc/<pid>/cmdline), read so that a process stuck in
// the kernel cannot hold vfiod up. The kernel copies another process's arguments
// out of its memory under that process's mmap lock: while the process is stuck
// holding it (a VMM pinning a large guest's RAM for a VFIO device, a fault on a dead
// mount), the read blocks, and a libuv pool thread with it (the pool has 4, shared
// by every file read vfiod makes). So each command line has one read at a time,
// shared by every caller that asks meanwhile: a stuck process ties up one thread,
// not the pool (FreshReads: a read waits for the one in flight, never beside it);
// and a caller stops waiting after a bound.
import fsp from "node:fs/promises";
import { FreshReads } from "../fresh-reads";

/** How long a caller waits: arguments come at once unless the process is stuck. */
export const COMMAND_LINE_WAIT_MS = 2000;

/** The process is stuck in the kernel: its command line did not come within the bound. */
export class CommandLineStuck extends Error {}

const reads = new FreshReads<string>();

/**
 * The arguments in `file` (a /proc/<pid>/cmdline), split at NUL.
 * @throws the read's errno error (ENOENT: the process is gone); CommandLineStuck after `waitMs`.
 */
export async function readCommandLine(file: string, waitMs = COMMAND_LINE_WAIT_MS): Promise<string[]> {
  const bound = AbortSignal.timeout(waitMs);
  try {
    const text = await reads.read(file, bound, `reading ${file}`, () => fsp.readFile(file, "utf8"));
    return text.split("\0").filter((arg) => arg !== "");
  } catch (err) {
    if (bound.aborted) throw new CommandLineStuck(`${file}: no answer within ${waitMs / 1000} s`, { cause: err });
    throw err;
  }
}
