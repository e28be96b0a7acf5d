// cocoon's own VM records, read the way ../shared/reference/cocoon.md A.5 says
// (v0.4-era JSON index). Never takes cocoon's vms.lock: it is exclusive even for
// readers, so holding it would stall cocoon's CLI, and cocoon's atomic renames
// already guarantee a complete file. Fields vfiod does not use are not checked,
// so later cocoon additions do not break the reader; fields it uses must have
// the type cocoon writes, or the file is refused as something vfiod misreads.
import fsp from "node:fs/promises";
import path from "node:path";
import { errnoOf } from "../errors";
import { KernelReadStuck, readCommandLine } from "../host/kernel-reads";
import { commandLineNamesSocket } from "./command-line";
import type { VmRecord } from "./vm";
import { isJsonObject, type JsonObject } from "../json";

/** One cocoon hypervisor backend: where its records live and how its process looks. */
export interface CocoonBackend {
  /** Directory name under cocoon's root_dir and run_dir. */
  readonly dir: string;
  readonly hypervisor: string;
  /** Pid file name in the VM's run dir. */
  readonly pidFile: string;
  /** Basename of the hypervisor binary (cocoon's ch_binary / fc_binary defaults). */
  readonly binary: string;
}

/** cocoon's `ch_binary` and `fc_binary` settings (cocoon.md A.5). */
export interface CocoonBinaries {
  readonly cloudHypervisor: string;
  readonly firecracker: string;
}

export const DEFAULT_COCOON_BINARIES: CocoonBinaries = { cloudHypervisor: "cloud-hypervisor", firecracker: "firecracker" };

/** cocoon's backends, with the hypervisor binary names a cocoon installation is configured with. */
export function cocoonBackends(binaries: CocoonBinaries = DEFAULT_COCOON_BINARIES): readonly CocoonBackend[] {
  return [
    { dir: "cloudhypervisor", hypervisor: "cloud-hypervisor", pidFile: "ch.pid", binary: binaries.cloudHypervisor },
    { dir: "firecracker", hypervisor: "firecracker", pidFile: "fc.pid", binary: binaries.firecracker },
  ];
}

export const COCOON_BACKENDS: readonly CocoonBackend[] = cocoonBackends();

export function cocoonIndexPath(root: string, backend: CocoonBackend): string {
  return path.join(root, backend.dir, "db", "vms.json");
}

/** Newer cocoon's sqlite record store, which vfiod cannot read. */
export function cocoonMetaDbPath(root: string): string {
  return path.join(root, "meta", "meta.db");
}

/** A cocoon VM as its index describes it, before the liveness check. */
export interface CocoonVm {
  /** The record, without `notRunning`. */
  readonly record: VmRecord;
  /** cocoon's recorded state ("running", "stopped", ...). */
  readonly state: string;
  readonly pidFile: string;
  readonly binary: string;
}

// Go leaves a field at its zero value when the key is absent or null; do the same.
function optionalString(obj: JsonObject, key: string, where: string): string | undefined {
  const value = obj[key];
  if (value === undefined || value === null) return undefined;
  if (typeof value !== "string") throw new Error(`${where}.${key}: must be a string`);
  return value;
}

function parseVm(id: string, raw: unknown, root: string, backend: CocoonBackend): CocoonVm {
  const where = `vms[${JSON.stringify(id)}]`;
  if (!isJsonObject(raw)) throw new Error(`${where}: must be an object`);
  const storedId = optionalString(raw, "id", where);
  if (storedId !== undefined && storedId !== id) {
    throw new Error(`${where}.id: ${JSON.stringify(storedId)} differs from its key`);
  }
  let name: string | undefined;
  if (raw.config !== undefined && raw.config !== null) {
    if (!isJsonObject(raw.config)) throw new Error(`${where}.config: must be an object`);
    name = optionalString(raw.config, "name", `${where}.config`);
  }
  const runDir = optionalString(raw, "run_dir", where) ?? path.join(root, "run", backend.dir, id);
  if (!path.isAbsolute(runDir)) throw new Error(`${where}.run_dir: must be an absolute path`);
  return {
    record: {
      id,
      name: name || id,
      hypervisor: backend.hypervisor,
      socket: path.join(runDir, "api.sock"),
      source: "cocoon",
      opsLockPath: path.join(runDir, "ops.lock"),
    },
    state: optionalString(raw, "state", where) ?? "",
    pidFile: path.join(runDir, backend.pidFile),
    binary: backend.binary,
  };
}

/**
 * The VMs in one backend's vms.json (`{"vms": {id: record}, "names": {...}}`).
 * Names come from each record's config.name, which cocoon writes together with
 * its `names` index in one atomic file.
 * @throws Error saying what is wrong and where.
 */
export function parseCocoonIndex(text: string, root: string, backend: CocoonBackend): CocoonVm[] {
  let doc: unknown;
  try {
    doc = JSON.parse(text);
  } catch (err) {
    throw new Error(`not JSON: ${(err as Error).message}`);
  }
  if (!isJsonObject(doc)) throw new Error("must be an object");
  if (doc.vms === undefined || doc.vms === null) return [];
  if (!isJsonObject(doc.vms)) throw new Error("vms: must be an object keyed by VM id");
  return Object.entries(doc.vms).map(([id, raw]) => parseVm(id, raw, root, backend));
}

// A hypervisor upgraded under a running VM leaves its exe link as "<path> (deleted)".
function exeBasename(link: string): string {
  return path.basename(link.replace(/ \(deleted\)$/, ""));
}

// Reading /proc races the process exiting: ENOENT then just means "gone".
async function readProc<T>(pid: number, read: () => Promise<T>): Promise<{ value: T } | { why: string }> {
  try {
    return { value: await read() };
  } catch (err) {
    const code = errnoOf(err);
    return { why: code === "ENOENT" ? `process ${pid} is not running` : `process ${pid} cannot be inspected (${code})` };
  }
}

async function whyNotRunning(vm: CocoonVm, procRoot: string): Promise<string | undefined> {
  if (vm.state !== "running") return `state is ${vm.state || "unset"}`;
  let pidText: string;
  try {
    pidText = (await fsp.readFile(vm.pidFile, "utf8")).trim();
  } catch (err) {
    const code = errnoOf(err);
    return code === "ENOENT" ? "pid file missing" : `pid file unreadable (${code})`;
  }
  if (!/^[1-9][0-9]{0,9}$/.test(pidText)) return "pid file invalid";
  const pid = Number(pidText);
  const proc = path.join(procRoot, String(pid));
  const exe = await readProc(pid, () => fsp.readlink(path.join(proc, "exe")));
  if ("why" in exe) return exe.why;
  if (exeBasename(exe.value) !== vm.binary) return `process ${pid} is not ${vm.binary}`;
  // A process stuck in the kernel (a first VFIO attach pinning a large guest's RAM takes
  // minutes) keeps its command line: its exe says it is the hypervisor, and the VM's
  // socket answers for itself.
  const stuck = (err: unknown) => (err instanceof KernelReadStuck ? undefined : Promise.reject(err));
  const args = await readProc(pid, () => readCommandLine(path.join(proc, "cmdline")).catch(stuck));
  if ("why" in args) return args.why;
  if (args.value !== undefined && !commandLineNamesSocket(args.value, vm.record.socket)) {
    return `process ${pid} is not serving ${vm.record.socket}`;
  }
  return undefined;
}

/**
 * The record, with `notRunning` set unless cocoon says running AND the pid file
 * names a live `binary` process whose command line carries the VM's API socket
 * (cocoon's own check; a stale pid may belong to anything by now).
 */
export async function checkCocoonVm(vm: CocoonVm, procRoot = "/proc"): Promise<VmRecord> {
  const notRunning = await whyNotRunning(vm, procRoot);
  return notRunning === undefined ? vm.record : { ...vm.record, notRunning };
}
