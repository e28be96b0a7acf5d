import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import pino from "pino";
import { Code, VfiodError } from "../../src/errors";
import { Inventory } from "../../src/inventory/inventory";
import type { VmRecord } from "../../src/inventory/vm";
import { vfiodRejection } from "../support/rejection";

const GPU_ID = "K7Q2MZ4XW3ABCDEFGHJ2345677";
const IDLE_ID = "K7QAAAAAAAAAAAAAAAAAAAAAAA";
const GPU_PID = 4242;

interface LogLine {
  level: number;
  msg: string;
  path?: string;
  err?: { message: string };
}
const ERROR = 50;
const WARN = 40;

let tmp: string;
let root: string;
let procRoot: string;
let inventoryFile: string;
let lines: LogLine[];
let inventory: Inventory;

function runDir(id: string, dir = "cloudhypervisor"): string {
  return path.join(root, "run", dir, id);
}

function chIndex(): string {
  return path.join(root, "cloudhypervisor", "db", "vms.json");
}

// Whole-file replace through a temp file in the same dir, the way cocoon writes.
function writeAtomic(file: string, text: string): void {
  fs.mkdirSync(path.dirname(file), { recursive: true });
  const temp = path.join(path.dirname(file), `.tmp-${process.hrtime.bigint()}`);
  fs.writeFileSync(temp, text);
  fs.renameSync(temp, file);
}

function cocoonRecord(id: string, name: string, state: string): object {
  return { id, state, config: { name, cpu: 1, memory: 536870912 }, pid: 0, first_booted: true, run_dir: runDir(id) };
}

function writeCocoon(extra: Record<string, object> = {}): void {
  const vms: Record<string, object> = {
    [GPU_ID]: cocoonRecord(GPU_ID, "gpu-vm", "running"),
    [IDLE_ID]: cocoonRecord(IDLE_ID, "idle-vm", "stopped"),
    ...extra,
  };
  const names = Object.fromEntries(Object.entries(vms).map(([id, vm]) => [(vm as { config: { name: string } }).config.name, id]));
  writeAtomic(chIndex(), JSON.stringify({ vms, names }));
}

/** gpu-vm's cloud-hypervisor: pid file, /proc/<pid>/exe and a cmdline naming its socket. */
function startGpuVm(): void {
  fs.mkdirSync(runDir(GPU_ID), { recursive: true });
  fs.writeFileSync(path.join(runDir(GPU_ID), "ch.pid"), `${GPU_PID}\n`);
  const proc = path.join(procRoot, String(GPU_PID));
  fs.mkdirSync(proc, { recursive: true });
  fs.symlinkSync("/usr/bin/cloud-hypervisor", path.join(proc, "exe"));
  const socket = path.join(runDir(GPU_ID), "api.sock");
  fs.writeFileSync(path.join(proc, "cmdline"), `cloud-hypervisor\0--api-socket\0path=${socket}\0`);
}

function staticVms(...names: string[]): string {
  return JSON.stringify({ vms: names.map((name) => ({ name, hypervisor: "qemu", socket: `/run/${name}/qmp.sock` })) });
}

function errors(): LogLine[] {
  return lines.filter((line) => line.level === ERROR);
}

function failure(ref: string): Promise<VfiodError> {
  return vfiodRejection(inventory.resolve(ref));
}

async function names(): Promise<string[]> {
  return (await inventory.all()).map((vm: VmRecord) => vm.name);
}

beforeEach(() => {
  tmp = fs.mkdtempSync(path.join(os.tmpdir(), "vfiod-"));
  root = path.join(tmp, "cocoon");
  procRoot = path.join(tmp, "proc");
  inventoryFile = path.join(tmp, "inventory.json");
  fs.mkdirSync(procRoot);
  lines = [];
  const log = pino({ level: "debug" }, { write: (line: string) => lines.push(JSON.parse(line) as LogLine) });
  inventory = new Inventory({ inventoryFile, cocoonRoot: root, procRoot, log });
});
afterEach(() => fs.rmSync(tmp, { recursive: true, force: true }));

describe("Inventory over cocoon's fixture", () => {
  beforeEach(() => {
    writeCocoon();
    startGpuVm();
  });

  test("resolves by name, unique id prefix; refuses an ambiguous or too-short prefix", async () => {
    const gpu = await inventory.resolve("gpu-vm");
    expect(gpu).toEqual({
      id: GPU_ID,
      name: "gpu-vm",
      hypervisor: "cloud-hypervisor",
      socket: path.join(runDir(GPU_ID), "api.sock"),
      source: "cocoon",
      opsLockPath: path.join(runDir(GPU_ID), "ops.lock"),
    });
    expect(await inventory.resolve("K7Q2MZ")).toEqual(gpu);
    const ambiguous = await failure("K7Q");
    expect(ambiguous.reason).toBe("VM_AMBIGUOUS");
    expect(ambiguous.code).toBe(Code.FAILED_PRECONDITION);
    expect(ambiguous.message).toContain(`gpu-vm (${GPU_ID}, cocoon)`);
    expect(ambiguous.message).toContain(`idle-vm (${IDLE_ID}, cocoon)`);
    expect((await failure("K7")).reason).toBe("VM_NOT_FOUND");
    expect(lines).toEqual([]);
  });

  test("a stopped VM is found, marked not running", async () => {
    const idle = await inventory.resolve("idle-vm");
    expect(idle).toMatchObject({ id: IDLE_ID, notRunning: "state is stopped" });
  });

  test("liveness is checked at every resolve, with the index unchanged", async () => {
    expect((await inventory.resolve("gpu-vm")).notRunning).toBeUndefined();
    fs.rmSync(path.join(procRoot, String(GPU_PID)), { recursive: true });
    expect((await inventory.resolve("gpu-vm")).notRunning).toBe(`process ${GPU_PID} is not running`);
    startGpuVm();
    expect((await inventory.resolve("gpu-vm")).notRunning).toBeUndefined();
  });

  test("all() lists every source, cocoon VMs with their liveness", async () => {
    fs.writeFileSync(inventoryFile, staticVms("vm1"));
    const all = await inventory.all();
    expect(all.map((vm) => [vm.name, vm.source, vm.notRunning])).toEqual([
      ["vm1", "inventory", undefined],
      ["gpu-vm", "cocoon", undefined],
      ["idle-vm", "cocoon", "state is stopped"],
    ]);
  });

  test("a name claimed by the static file and cocoon is ambiguous", async () => {
    fs.writeFileSync(inventoryFile, staticVms("vm1", "gpu-vm"));
    expect((await inventory.resolve("vm1")).source).toBe("inventory");
    const err = await failure("gpu-vm");
    expect(err.reason).toBe("VM_AMBIGUOUS");
    expect(err.message).toBe(`vm "gpu-vm" is ambiguous: matches gpu-vm (gpu-vm, inventory), gpu-vm (${GPU_ID}, cocoon)`);
  });

  test("a VM cocoon adds by atomic rename is found without a restart", async () => {
    expect((await failure("new-vm")).reason).toBe("VM_NOT_FOUND");
    writeCocoon({ NEWVMAAAAAAAAAAAAAAAAAAAAA: cocoonRecord("NEWVMAAAAAAAAAAAAAAAAAAAAA", "new-vm", "running") });
    expect((await inventory.resolve("new-vm")).id).toBe("NEWVMAAAAAAAAAAAAAAAAAAAAA");
    expect((await inventory.resolve("new-vm")).notRunning).toBe("pid file missing");
  });

  test("a firecracker index is read beside the cloud-hypervisor one", async () => {
    const record = { state: "running", config: { name: "fc-vm" } };
    writeAtomic(path.join(root, "firecracker", "db", "vms.json"), JSON.stringify({ vms: { FCVMAAAAAAAAAAAAAAAAAAAAAA: record } }));
    expect(await inventory.resolve("fc-vm")).toMatchObject({
      hypervisor: "firecracker",
      socket: path.join(runDir("FCVMAAAAAAAAAAAAAAAAAAAAAA", "firecracker"), "api.sock"),
      notRunning: "pid file missing",
    });
  });

  test("a malformed static file is logged once with its path; cocoon keeps serving", async () => {
    fs.writeFileSync(inventoryFile, JSON.stringify({ vms: [{ name: "vm1", hypervisor: "qemu" }] }));
    expect((await inventory.resolve("gpu-vm")).id).toBe(GPU_ID);
    expect((await inventory.resolve("gpu-vm")).id).toBe(GPU_ID);
    await inventory.all();
    expect(errors()).toHaveLength(1);
    expect(errors()[0]).toMatchObject({ path: inventoryFile, err: { message: 'vms[0]: missing "socket"' } });
    const missing = await failure("vm1");
    expect(missing.reason).toBe("VM_NOT_FOUND");
    expect(missing.message).toMatch(/^vm "vm1" not found among the 2 VMs vfiod can see \(0 in --inventory .*inventory\.json \(unreadable\); 2 in cocoon root .*\); some VM records could not be read \(see the vfiod log\)$/);

    writeAtomic(inventoryFile, staticVms("vm1"));
    expect((await inventory.resolve("vm1")).source).toBe("inventory");
    writeAtomic(inventoryFile, "{not json");
    expect((await failure("vm1")).reason).toBe("VM_NOT_FOUND");
    await inventory.resolve("gpu-vm");
    expect(errors()).toHaveLength(2);
    expect(errors()[1]?.err?.message).toMatch(/^not JSON: /);
  });

  test("concurrent calls that meet a malformed file log it once", async () => {
    writeAtomic(chIndex(), "{");
    await Promise.all(Array.from({ length: 5 }, () => inventory.all()));
    expect(errors()).toHaveLength(1);
  });

  test("a malformed cocoon index is logged once; the static file and the other backend keep serving", async () => {
    fs.writeFileSync(inventoryFile, staticVms("vm1"));
    writeAtomic(path.join(root, "firecracker", "db", "vms.json"), JSON.stringify({ vms: { FCVM: { config: { name: "fc-vm" } } } }));
    writeAtomic(chIndex(), JSON.stringify({ vms: { [GPU_ID]: { state: 1 } } }));
    expect((await inventory.resolve("vm1")).source).toBe("inventory");
    expect((await inventory.resolve("fc-vm")).id).toBe("FCVM");
    expect((await failure("gpu-vm")).reason).toBe("VM_NOT_FOUND");
    expect(errors()).toHaveLength(1);
    expect(errors()[0]).toMatchObject({ path: chIndex(), err: { message: `vms["${GPU_ID}"].state: must be a string` } });
  });

  test("the sqlite store of newer cocoon is warned about once, with its path", async () => {
    const metaDb = path.join(root, "meta", "meta.db");
    fs.mkdirSync(path.dirname(metaDb));
    fs.writeFileSync(metaDb, "SQLite format 3\0");
    expect((await inventory.resolve("gpu-vm")).id).toBe(GPU_ID);
    await inventory.all();
    const warnings = lines.filter((line) => line.level === WARN);
    expect(warnings).toHaveLength(1);
    expect(warnings[0]?.path).toBe(metaDb);
    expect(warnings[0]?.msg).toMatch(/sqlite.*invisible to vfiod/);
    expect((await failure("nope")).message).toContain("some VM records could not be read");
  });
});

describe("Inventory static file changes", () => {
  test("missing files mean no VMs, quietly; a file created later is read", async () => {
    expect(await names()).toEqual([]);
    const err = await failure("vm1");
    // Says where vfiod looked, so a newcomer knows what to configure.
    expect(err.message).toBe(
      `vm "vm1" not found among the 0 VMs vfiod can see (--inventory ${inventoryFile} does not exist; cocoon root ${path.join(tmp, "cocoon")} does not exist)`,
    );
    fs.writeFileSync(inventoryFile, staticVms("vm1"));
    expect(await names()).toEqual(["vm1"]);
    fs.rmSync(inventoryFile);
    expect(await names()).toEqual([]);
    expect(lines).toEqual([]);
  });

  test("an atomic rename and an in-place rewrite are both seen", async () => {
    fs.writeFileSync(inventoryFile, staticVms("vm1"));
    expect(await names()).toEqual(["vm1"]);
    writeAtomic(inventoryFile, staticVms("vm2", "vm3"));
    expect(await names()).toEqual(["vm2", "vm3"]);
    fs.writeFileSync(inventoryFile, staticVms("vm4"));
    expect(await names()).toEqual(["vm4"]);
  });

  test("a file whose inode, size and mtime are unchanged is not read again", async () => {
    const mtime = new Date("2026-01-01T00:00:00Z");
    fs.writeFileSync(inventoryFile, staticVms("aaa"));
    fs.utimesSync(inventoryFile, mtime, mtime);
    expect(await names()).toEqual(["aaa"]);
    fs.writeFileSync(inventoryFile, staticVms("bbb"));
    fs.utimesSync(inventoryFile, mtime, mtime);
    expect(await names()).toEqual(["aaa"]);
    fs.utimesSync(inventoryFile, mtime, new Date("2026-01-01T00:00:01Z"));
    expect(await names()).toEqual(["bbb"]);
  });

  test("a directory where the file should be is logged once, like a malformed file", async () => {
    fs.mkdirSync(inventoryFile);
    writeCocoon();
    expect((await inventory.resolve("gpu-vm")).id).toBe(GPU_ID);
    expect((await inventory.resolve("gpu-vm")).id).toBe(GPU_ID);
    expect(errors()).toHaveLength(1);
    expect(errors()[0]).toMatchObject({ path: inventoryFile, err: { message: "not a regular file" } });
  });

  test("an unreadable path (a file where a directory should be) is logged once", async () => {
    fs.writeFileSync(path.join(tmp, "plain"), "");
    const log = pino({ level: "debug" }, { write: (line: string) => lines.push(JSON.parse(line) as LogLine) });
    inventory = new Inventory({ inventoryFile: path.join(tmp, "plain", "inventory.json"), log });
    expect(await names()).toEqual([]);
    expect(await names()).toEqual([]);
    expect(errors()).toHaveLength(1);
    expect(errors()[0]?.err?.message).toContain("ENOTDIR");
  });

  test("without any source configured there are no VMs", async () => {
    inventory = new Inventory({ log: pino({ level: "silent" }) });
    expect(await names()).toEqual([]);
    expect((await failure("vm1")).reason).toBe("VM_NOT_FOUND");
    expect((await failure("")).reason).toBe("INVALID_ARGUMENT");
  });
});
