// Reads of /proc-like files: a FIFO no one writes stands in for the cmdline of a
// process stuck in the kernel, or a mountinfo behind a hung unmount (a read of it
// blocks a libuv pool thread the same way, until a writer comes).
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import fsp from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { KernelReadStuck, readCommandLine } from "../../src/host/kernel-reads";

let dir: string;
const fifos: string[] = [];

beforeEach(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "vfiod-cmdline-"));
});

afterEach(() => {
  // A writer that opens and closes ends every read still blocked on the FIFO (with EOF).
  for (const fifo of fifos.splice(0)) fs.closeSync(fs.openSync(fifo, fs.constants.O_WRONLY | fs.constants.O_NONBLOCK));
  fs.rmSync(dir, { recursive: true, force: true });
});

/** A cmdline whose read blocks until the test ends. */
function stuckCmdline(): string {
  const fifo = path.join(dir, `cmdline-${fifos.length}`);
  execFileSync("mkfifo", [fifo]);
  fifos.push(fifo);
  return fifo;
}

describe("readKernelText and readCommandLine", () => {
  test("the arguments, split at NUL", async () => {
    const file = path.join(dir, "cmdline");
    fs.writeFileSync(file, "cloud-hypervisor\0--api-socket\0path=/run/vm.sock\0");
    expect(await readCommandLine(file)).toEqual(["cloud-hypervisor", "--api-socket", "path=/run/vm.sock"]);
  });

  test("a process gone: the read's ENOENT", async () => {
    await expect(readCommandLine(path.join(dir, "gone"))).rejects.toMatchObject({ code: "ENOENT" });
  });

  test("a process stuck in the kernel: KernelReadStuck after the bound, not a hang", async () => {
    const started = performance.now();
    await expect(readCommandLine(stuckCmdline(), 200)).rejects.toBeInstanceOf(KernelReadStuck);
    expect(performance.now() - started).toBeLessThan(2000);
  });

  test("20 callers asking for a stuck process's command line tie up one pool thread, not the pool", async () => {
    const fifo = stuckCmdline();
    const callers = Array.from({ length: 20 }, () => readCommandLine(fifo, 1000).catch((err: unknown) => err));
    // libuv has 4 pool threads: 20 reads of their own would take them all, and this read would wait.
    const other = path.join(dir, "other");
    fs.writeFileSync(other, "still served");
    const served = await Promise.race([fsp.readFile(other, "utf8"), sleep(2000).then(() => "not within 2 s: the pool is taken")]);
    expect(served).toBe("still served");
    for (const err of await Promise.all(callers)) expect(err).toBeInstanceOf(KernelReadStuck);
  });
});
