// The kernel's view of who holds a VFIO node, read from the real /proc: real
// processes hold files of a fake /dev/vfio open (the host root points there). Group
// numbers no real host uses, as a real VMM holding the real node would count too.
import { spawn, type ChildProcess } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { VfioHolders } from "../../src/host/vfio-holders";
import type { Logger } from "../../src/log";
import { skipOutsideCi } from "../support/skip";
import { waitFor } from "../support/wait";

const quiet = { warn: () => undefined } as unknown as Logger;
const never = new AbortController().signal;

let root: string;
const children: ChildProcess[] = [];

beforeEach(() => {
  root = fs.mkdtempSync(path.join(os.tmpdir(), "vfiod-holders-"));
  fs.mkdirSync(path.join(root, "dev/vfio"), { recursive: true });
  fs.writeFileSync(path.join(root, "dev/vfio/4093"), "");
});

afterEach(() => {
  for (const child of children.splice(0)) child.kill("SIGKILL");
  fs.rmSync(root, { recursive: true, force: true });
});

/** A process with no open files at all (as a kernel thread has none) that opens `file` on SIGUSR1. */
function emptyProcess(file: string): ChildProcess {
  const script = 'use POSIX; POSIX::close($_) for 0..1023; $SIG{USR1} = sub { open(my $f, "<", $ARGV[0]); push @held, $f }; sleep 1 while 1;';
  const child = spawn("perl", ["-e", script, file], { stdio: "ignore" });
  children.push(child);
  return child;
}

const openCount = (pid: number) => fs.readdirSync(`/proc/${pid}/fd`).length;

describe("VfioHolders", () => {
  test("a process holding a group node open is found, with its command line", async () => {
    const fd = fs.openSync(path.join(root, "dev/vfio/4093"), "r");
    const child = spawn("sleep", ["60"], { stdio: ["ignore", "ignore", "ignore", fd] });
    fs.closeSync(fd);
    children.push(child);
    await waitFor(() => fs.existsSync(`/proc/${child.pid}/fd/3`), "sleep holds the node");
    const holders = new VfioHolders("/proc", root, quiet);
    expect(await holders.holders(["/dev/vfio/4093"], never)).toEqual([{ pid: child.pid, command: "sleep", args: ["sleep", "60"] }]);
    expect(await holders.holders(["/dev/vfio/4094"], never)).toEqual([]);
  });

  test("a process with no open files is not looked at again for a second: a node it opens meanwhile is found after that second", async () => {
    if (fs.statSync("/proc/self/fd").size === 0) {
      skipOutsideCi("the no-open-files shortcut", "this kernel (before 6.2) does not count open files as /proc/<pid>/fd's size");
      return;
    }
    const child = emptyProcess(path.join(root, "dev/vfio/4093"));
    await waitFor(() => openCount(child.pid!) === 0, "perl closes every file");
    const holders = new VfioHolders("/proc", root, quiet);
    const firstScan = performance.now();
    expect(await holders.holders(["/dev/vfio/4093"], never)).toEqual([]);
    child.kill("SIGUSR1");
    await waitFor(() => openCount(child.pid!) === 1, "perl opens the node");
    // Within the second: the scan takes the process to have no files still.
    expect(performance.now() - firstScan).toBeLessThan(900);
    expect(await holders.holders(["/dev/vfio/4093"], never)).toEqual([]);
    await sleep(1000 - (performance.now() - firstScan) + 50);
    expect((await holders.holders(["/dev/vfio/4093"], never)).map((p) => p.pid)).toEqual([child.pid]);
  });
});
