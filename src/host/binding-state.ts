// --state-dir: the one thing vfiod keeps (../shared/contract.md, "Conventions"):
// for each device managed binding moved from its host driver to vfio-pci, which
// driver it had and which VM it went to, so the driver is restored after the VM
// releases it, also across a vfiod restart or crash. One small JSON file per
// device, <dir>/<bdf>.json, written (to a temporary file, fsynced, renamed, the
// directory fsynced) before sysfs is touched. A tmpfs (/run/vfiod) is right: a
// reboot forgets the binding too.
import fs from "node:fs/promises";
import path from "node:path";
import type { VmRecord } from "../inventory/vm";

export const STATE_VERSION = 1;

/**
 * Where a managed device is: "binding" from the state write until its attach
 * completed; "attached" once it did; "releasing" once a removal was requested
 * (or vfiod could not tell, after a restart) and the driver waits to be restored.
 */
export type BindingPhase = "binding" | "attached" | "releasing";

/** One managed device, as its state file holds it. */
export interface BindingRecord {
  readonly version: typeof STATE_VERSION;
  readonly bdf: string;
  /** The host driver it had; null when it was bound to none (then it is left unbound). */
  readonly driver: string | null;
  /** The VFIO driver vfiod bound it to. */
  readonly boundTo: string;
  /** The VM it was bound for. */
  readonly vm: Pick<VmRecord, "id" | "name" | "source" | "hypervisor" | "socket">;
  /** Its id in that VM: the caller's, or the hypervisor's once known; "" until then. */
  readonly id: string;
  readonly phase: BindingPhase;
  /** When this record was last written (ISO 8601). */
  readonly since: string;
}

const BDF_FILE = /^[0-9a-f]{4,5}:[0-9a-f]{2}:[01][0-9a-f]\.[0-7]\.json$/;

/** A state file that could not be read as a record: left in place, and reported. */
export interface UnreadableState {
  readonly file: string;
  readonly why: string;
}

export class BindingState {
  constructor(readonly dir: string) {}

  /**
   * Creates the directory (0700) if it is missing, and removes the temporary files
   * of writes a crash cut short (their rename never happened, so nothing changed
   * after them). At start only: a running vfiod's writes have temporary files too.
   */
  async open(): Promise<void> {
    await fs.mkdir(this.dir, { recursive: true, mode: 0o700 });
    for (const name of await fs.readdir(this.dir)) {
      if (name.endsWith(".tmp")) await fs.rm(path.join(this.dir, name), { force: true });
    }
  }

  /** Writes `record` durably: once this resolves, a crash leaves it on disk. */
  async save(record: BindingRecord): Promise<void> {
    const file = this.fileOf(record.bdf);
    const temporary = `${file}.${process.pid}.tmp`;
    const handle = await fs.open(temporary, "w", 0o600);
    try {
      await handle.writeFile(`${JSON.stringify(record, null, 2)}\n`);
      await handle.sync();
    } finally {
      await handle.close();
    }
    await fs.rename(temporary, file);
    await this.syncDir();
  }

  /** Forgets the device's record (durably). */
  async forget(bdf: string): Promise<void> {
    await fs.rm(this.fileOf(bdf), { force: true });
    await this.syncDir();
  }

  /** The device's record, undefined when there is none or it cannot be read. */
  async get(bdf: string): Promise<BindingRecord | undefined> {
    const read = await this.read(`${bdf}.json`);
    return "record" in read ? read.record : undefined;
  }

  /** Every record, and the files that are not records (left alone). A missing directory holds none. */
  async list(): Promise<{ records: BindingRecord[]; unreadable: UnreadableState[] }> {
    let names: string[];
    try {
      names = await fs.readdir(this.dir);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === "ENOENT") return { records: [], unreadable: [] };
      throw err;
    }
    const records: BindingRecord[] = [];
    const unreadable: UnreadableState[] = [];
    for (const name of names.sort()) {
      if (name.endsWith(".tmp")) continue; // a write in progress, or one a crash cut short (open() removes those)
      const read = await this.read(name);
      if ("record" in read) records.push(read.record);
      else unreadable.push({ file: path.join(this.dir, name), why: read.why });
    }
    return { records, unreadable };
  }

  private async read(name: string): Promise<{ record: BindingRecord } | { why: string }> {
    if (!BDF_FILE.test(name)) return { why: "not a <bdf>.json state file" };
    let text: string;
    try {
      text = await fs.readFile(path.join(this.dir, name), "utf8");
    } catch (err) {
      return { why: (err as Error).message };
    }
    try {
      const record = JSON.parse(text) as BindingRecord;
      const valid =
        record.version === STATE_VERSION &&
        `${record.bdf}.json` === name &&
        (record.driver === null || typeof record.driver === "string") &&
        typeof record.boundTo === "string" &&
        typeof record.vm?.id === "string" &&
        typeof record.id === "string" &&
        ["binding", "attached", "releasing"].includes(record.phase);
      return valid ? { record } : { why: "not a state record of this vfiod version" };
    } catch (err) {
      return { why: `not JSON: ${(err as Error).message}` };
    }
  }

  private fileOf(bdf: string): string {
    return path.join(this.dir, `${bdf}.json`);
  }

  private async syncDir(): Promise<void> {
    const handle = await fs.open(this.dir, "r");
    try {
      await handle.sync();
    } finally {
      await handle.close();
    }
  }
}
