// Every VM vfiod can reach: the --inventory file plus cocoon's records, re-read
// when they change so a VM created after start is found without a restart.
// Change is seen by stat (ino, size, mtime) on every call rather than fs.watch:
// cocoon replaces its index by rename, which a watch on the old inode misses.
import fs, { type Stats } from "node:fs";
import fsp from "node:fs/promises";
import { errnoOf, isVfiodError, VfiodError } from "../errors";
import type { Logger } from "../log";
import {
  checkCocoonVm,
  cocoonBackends,
  cocoonIndexPath,
  cocoonMetaDbPath,
  parseCocoonIndex,
  type CocoonBinaries,
  type CocoonVm,
} from "./cocoon";
import { resolveVm } from "./resolve";
import { parseInventoryFile } from "./static-file";
import type { VmRecord, VmSource } from "./vm";

export interface InventoryOptions {
  /** The --inventory file; absent = no static VMs. */
  inventoryFile?: string;
  /** cocoon's root_dir; absent = no cocoon VMs. */
  cocoonRoot?: string;
  /** cocoon's ch_binary / fc_binary, when not cocoon's defaults. */
  cocoonBinaries?: CocoonBinaries;
  /** Where pids are looked up for cocoon's liveness check (tests use a fake). */
  procRoot?: string;
  /** Hypervisor types vfiod has a backend for: a static entry naming another is refused alone. */
  hypervisors?: ReadonlySet<string>;
  log: Logger;
}

/** What a file held when last read: a missing file holds no VMs. */
interface FileState<T> {
  readonly items: readonly T[];
  readonly exists: boolean;
  /** The file exists but could not be used (already logged). */
  readonly unreadable: boolean;
}

const NO_FILE = { items: [], exists: false, unreadable: false } as const;

/**
 * One records file, parsed again only when its (ino, size, mtime) changes.
 * A file that cannot be used contributes no VMs and is logged once per version;
 * a stat error stands in for the version, so it too is logged once.
 */
class WatchedFile<T> {
  private version: string | undefined;
  private state: FileState<T> = NO_FILE;
  // Concurrent calls share one look at the file, so a bad version is logged once.
  private pending: Promise<FileState<T>> | undefined;

  constructor(
    readonly path: string,
    private readonly source: VmSource,
    private readonly parse: (text: string) => T[],
    private readonly log: Logger,
  ) {}

  read(): Promise<FileState<T>> {
    this.pending ??= this.refresh().finally(() => {
      this.pending = undefined;
    });
    return this.pending;
  }

  private async refresh(): Promise<FileState<T>> {
    let stat: Stats | undefined;
    try {
      // Every call looks: a synchronous stat is a syscall, an async one a thread-pool round
      // trip; and a missing file (the common case) answers without building an exception.
      stat = fs.statSync(this.path, { throwIfNoEntry: false });
    } catch (err) {
      const code = errnoOf(err);
      return this.version === code ? this.state : this.fail(code, err);
    }
    if (stat === undefined) return this.settle(undefined, NO_FILE);
    const version = `${stat.ino}:${stat.size}:${stat.mtimeMs}`;
    if (version === this.version) return this.state;
    if (!stat.isFile()) return this.fail(version, new Error("not a regular file"));
    try {
      return this.settle(version, { items: this.parse(await fsp.readFile(this.path, "utf8")), exists: true, unreadable: false });
    } catch (err) {
      return this.fail(version, err);
    }
  }

  private settle(version: string | undefined, state: FileState<T>): FileState<T> {
    this.version = version;
    this.state = state;
    return state;
  }

  private fail(version: string, err: unknown): FileState<T> {
    this.log.error(
      { path: this.path, source: this.source, err },
      "VM records file unusable; its VMs are unavailable until it changes",
    );
    return this.settle(version, { items: [], exists: true, unreadable: true });
  }
}

/** What every source held at one look. */
class Snapshot {
  constructor(
    readonly fixedFile: FileState<VmRecord>,
    readonly cocoonFiles: readonly FileState<CocoonVm>[],
    /** cocoon also keeps VM records in sqlite, which vfiod does not read. */
    private readonly metaDb: boolean,
  ) {}

  get fixed(): readonly VmRecord[] {
    return this.fixedFile.items;
  }

  get cocoon(): CocoonVm[] {
    return this.cocoonFiles.flatMap((file) => file.items);
  }

  /** Some records exist that vfiod could not read, so a miss may be a false one. */
  get incomplete(): boolean {
    return this.metaDb || this.fixedFile.unreadable || this.cocoonFiles.some((file) => file.unreadable);
  }
}

export class Inventory {
  private readonly inventoryFile: WatchedFile<VmRecord> | undefined;
  private readonly cocoonFiles: WatchedFile<CocoonVm>[];
  private readonly metaDb: string | undefined;
  private readonly cocoonRoot: string | undefined;
  private metaDbLogged = false;
  private readonly procRoot: string | undefined;
  private readonly log: Logger;

  constructor(options: InventoryOptions) {
    const { inventoryFile, cocoonRoot, log } = options;
    this.log = log;
    this.procRoot = options.procRoot;
    this.cocoonRoot = cocoonRoot;
    const parseStatic = (text: string) => {
      const { vms, refused } = parseInventoryFile(text, options.hypervisors);
      // Parsed once per version of the file, so each refusal is logged once.
      for (const why of refused) log.error({ path: inventoryFile, why }, "inventory entry refused; the file's other VMs are served");
      return vms;
    };
    this.inventoryFile = inventoryFile === undefined ? undefined : new WatchedFile(inventoryFile, "inventory", parseStatic, log);
    this.cocoonFiles =
      cocoonRoot === undefined
        ? []
        : cocoonBackends(options.cocoonBinaries).map((backend) => {
            const parse = (text: string) => parseCocoonIndex(text, cocoonRoot, backend);
            return new WatchedFile(cocoonIndexPath(cocoonRoot, backend), "cocoon", parse, log);
          });
    this.metaDb = cocoonRoot === undefined ? undefined : cocoonMetaDbPath(cocoonRoot);
  }

  /**
   * The VM `ref` names (id, name or unique id prefix of 3+ characters) across all
   * sources. A cocoon VM that is not reachable now comes back with `notRunning`.
   * @throws VfiodError INVALID_ARGUMENT, VM_NOT_FOUND, VM_AMBIGUOUS.
   */
  async resolve(ref: string): Promise<VmRecord> {
    const snapshot = await this.snapshot();
    let found: VmRecord;
    try {
      found = resolveVm(ref, [...snapshot.fixed, ...snapshot.cocoon.map((vm) => vm.record)]);
    } catch (err) {
      if (!isVfiodError(err, "VM_NOT_FOUND")) throw err;
      const unread = snapshot.incomplete ? "; some VM records could not be read (see the vfiod log)" : "";
      const sources = this.describeSources(snapshot);
      throw new VfiodError("VM_NOT_FOUND", `${err.message} among ${sources}${unread}`, { cause: err });
    }
    const cocoonVm = snapshot.cocoon.find((vm) => vm.record === found);
    return cocoonVm === undefined ? found : checkCocoonVm(cocoonVm, this.procRoot);
  }

  /** Every VM from every source, cocoon ones with their liveness checked now. */
  async all(): Promise<VmRecord[]> {
    const snapshot = await this.snapshot();
    const cocoon = await Promise.all(snapshot.cocoon.map((vm) => checkCocoonVm(vm, this.procRoot)));
    return [...snapshot.fixed, ...cocoon];
  }

  /** Every VM record from every source, without liveness checks (no /proc reads). */
  async records(): Promise<VmRecord[]> {
    const snapshot = await this.snapshot();
    return [...snapshot.fixed, ...snapshot.cocoon.map((vm) => vm.record)];
  }

  private async snapshot(): Promise<Snapshot> {
    const [fixed, metaDb, ...cocoon] = await Promise.all([
      this.inventoryFile?.read() ?? NO_FILE,
      this.metaDbExists(),
      ...this.cocoonFiles.map((file) => file.read()),
    ]);
    return new Snapshot(fixed, cocoon, metaDb);
  }

  /**
   * Where vfiod looked, for a VM_NOT_FOUND a newcomer can act on: "the 0 VMs vfiod
   * can see (no --inventory file given; cocoon root /var/lib/cocoon does not exist)".
   */
  private describeSources(snapshot: Snapshot): string {
    const total = snapshot.fixed.length + snapshot.cocoon.length;
    const { fixedFile: fixed, cocoonFiles: cocoon } = snapshot;
    const cocoonRootExists = this.cocoonRoot !== undefined && fs.existsSync(this.cocoonRoot);
    const file = this.inventoryFile;
    const staticPart =
      file === undefined
        ? "no --inventory file given"
        : !fixed.exists
          ? `--inventory ${file.path} does not exist`
          : `${fixed.items.length} in --inventory ${file.path}${fixed.unreadable ? " (unreadable)" : ""}`;
    const root = this.cocoonRoot;
    const cocoonPart =
      root === undefined
        ? "no cocoon root"
        : !cocoonRootExists
          ? `cocoon root ${root} does not exist`
          : `${cocoon.reduce((n, f) => n + f.items.length, 0)} in cocoon root ${root} (${this.cocoonFiles
              .map((f, i) => `${f.path}${cocoon[i]?.exists === true ? "" : ": absent"}`)
              .join(", ")})`;
    return `the ${total} VM${total === 1 ? "" : "s"} vfiod can see (${staticPart}; ${cocoonPart})`;
  }

  private async metaDbExists(): Promise<boolean> {
    if (this.metaDb === undefined || fs.statSync(this.metaDb, { throwIfNoEntry: false }) === undefined) return false;
    if (!this.metaDbLogged) {
      this.metaDbLogged = true;
      this.log.warn(
        { path: this.metaDb },
        "cocoon keeps VM records in sqlite here (newer cocoon); vfiod reads only " +
          "<cocoon-root>/<backend>/db/vms.json, so VMs recorded only in this database are invisible to vfiod",
      );
    }
    return true;
  }
}
