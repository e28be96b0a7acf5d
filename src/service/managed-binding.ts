// Managed binding (AttachRequest.managed, vfiod --manage-binding): a device on a
// host driver is bound to vfio-pci for its Attach, and given its driver back once
// the hypervisor has released it. How libvirt and Kata do it
// (../shared/reference/binding-and-events.md §1, host-vfio-sysfs.md §5):
//
//   bind:     check every device (host use, driver) -> remember its driver in
//             --state-dir (fsynced) -> driver_override, driver/unbind, drivers_probe
//             -> wait, bounded, for the VFIO driver and its group node; any failure
//             puts back every device this call touched.
//   restore:  once the hypervisor released it and no process holds its group open:
//             driver_override cleared ("\n"), driver/unbind, drivers_probe (the kernel
//             picks its own driver again; a device that had none stays unbound).
//   pending:  a removal the guest has not finished (DETACH_PENDING, a rollback's) is
//             watched in the background: the VM is asked through its backend at an
//             interval, one look per VM at a time, each bounded; a device vfiod sees
//             leave a VM some other way (List, the background refresh) is checked too.
//   restart:  repair() reads --state-dir: a device whose attach never completed and
//             that no process holds goes back at once; one still held is kept for its
//             Detach; one that was attached waits for its VM to say it let go.
//
// Never: new_id (it would grab every device with the same vendor:device), a device
// outside --allow-devices (checked before this runs), a bridge, a device the host
// is using, an unbind of a device whose group a process holds open (the kernel would
// block on it), or a module load. Every sysfs write goes through one SysfsWriter.
import type { AttachedDevice } from "../backends/backend";
import type { BackendRegistry } from "../backends/registry";
import { VfiodError } from "../errors";
import { BindingState, type BindingRecord } from "../host/binding-state";
import type { HostUseCheck } from "../host/host-use";
import { isVfioDriver } from "../host/preflight";
import { pciDevicesDir, readLinkName } from "../host/sysfs";
import type { SysfsWriter } from "../host/sysfs-writer";
import type { VfioDriverChoice, VfioDriverChooser } from "../host/vfio-driver";
import type { VfioHolders } from "../host/vfio-holders";
import type { VmRecord } from "../inventory/vm";
import type { KeyedLocks } from "../keyed-locks";
import type { Logger } from "../log";
import { addressOfBdf } from "../pci/address";
import { sameVm, vmKey, type DeviceView } from "../view/device-view";
import fs from "node:fs";
import path from "node:path";
import { setTimeout as sleep } from "node:timers/promises";

/** How long the kernel may take to bind a device to its VFIO driver and create the group node. */
export const BIND_WAIT_MS = 10_000;
/** How long a restored device may take to be claimed by its driver again (some probe asynchronously). */
const REBIND_WAIT_MS = 10_000;
/** After the hypervisor let go, how long its process may take to close the group node. */
const CLOSE_WAIT_MS = 3_000;
const POLL_MS = 25;
/** A restore the kernel refused is retried at most this often. */
const RETRY_MAX_MS = 60_000;

export interface ManagedBindingDeps {
  /** Where sys/ and dev/ are read ("/"); writes go through `writer`. */
  readonly sysfsRoot: string;
  readonly writer: SysfsWriter;
  readonly state: BindingState;
  readonly drivers: VfioDriverChooser;
  readonly hostUse: HostUseCheck;
  readonly holders: VfioHolders;
  readonly view: DeviceView;
  /** The same locks Attach takes: a device's restore holds its IOMMU group's lock. */
  readonly locks: KeyedLocks;
  readonly inventory: { records(): Promise<readonly VmRecord[]> };
  readonly backends: BackendRegistry;
  readonly log: Logger;
  /** Between two looks at devices whose removal is pending. */
  readonly pollMs: number;
  /** How long one VM may take to answer such a look. */
  readonly perVmMs: number;
  /** How long a bind (and a rebind) may take (BIND_WAIT_MS). */
  readonly bindWaitMs?: number;
}

/** One device of a managed Attach, as planned before anything is written. */
interface PlannedDevice {
  readonly bdf: string;
  /** Its driver now (undefined: none). */
  readonly current: string | undefined;
  /** The VFIO driver to bind it to; undefined when it is on one already. */
  readonly target: VfioDriverChoice | undefined;
  /** vfiod's record of it from an earlier managed Attach (it is on vfio-pci because of vfiod). */
  readonly prior: BindingRecord | undefined;
}

/** The lock Attach holds across an IOMMU group's checks and attach; restores take it too. */
export function groupLockKey(group: string): string {
  return `iommu-group:${group}`;
}

export class ManagedBinding {
  private timer: NodeJS.Timeout | undefined;
  private unsubscribe: (() => void) | undefined;
  /** VMs being looked at now (one look per VM at a time). */
  private readonly looking = new Set<string>();
  /** Restores the kernel refused: when to try again. */
  private readonly retries = new Map<string, { failures: number; at: number }>();
  /** Records whose VM could not be asked, said once each. */
  private readonly unanswered = new Set<string>();
  /** Devices a VM let go while their group was busy: marked "releasing" by the next sweep. */
  private readonly toMark = new Map<string, VmRecord>();
  private sweeping: Promise<void> | undefined;

  constructor(private readonly deps: ManagedBindingDeps) {}

  // ---- Attach ----

  /**
   * Everything a managed Attach checks before it writes: vfio-pci is loaded, the
   * host is not using any device to bind, which driver each gets. Writes nothing.
   * Call it holding the IOMMU group's lock.
   * @throws DEVICE_BUSY_ON_HOST, DEVICE_NOT_VFIO (vfio-pci not loaded)
   */
  async plan(bdfs: readonly string[], signal: AbortSignal): Promise<BindPlan> {
    const devices: PlannedDevice[] = [];
    const toBind: string[] = [];
    for (const bdf of bdfs) {
      const current = this.driverOf(bdf);
      const prior = await this.deps.state.get(bdf);
      const onVfio = current !== undefined && isVfioDriver(current);
      if (!onVfio) toBind.push(bdf);
      devices.push({ bdf, current, target: undefined, prior });
    }
    if (toBind.length > 0 && !this.deps.drivers.vfioPciLoaded()) {
      throw new VfiodError(
        "DEVICE_NOT_VFIO",
        `managed binding of ${toBind.join(", ")}: vfio-pci is not loaded (vfiod loads no modules); run modprobe vfio-pci`,
        { meta: { device: toBind[0]! } },
      );
    }
    await this.deps.hostUse.refuse(toBind, signal);
    const planned = await Promise.all(
      devices.map(async (d) => (toBind.includes(d.bdf) ? { ...d, target: await this.deps.drivers.choose(d.bdf) } : d)),
    );
    return new BindPlan(this, planned);
  }

  /** Writes the record durably: before anything about its device changes. */
  async record(record: BindingRecord): Promise<void> {
    await this.save(record);
  }

  /** Binds a recorded device as planned; the caller puts it back on failure. */
  async bind(device: PlannedDevice, record: BindingRecord, vm: VmRecord, log: Logger): Promise<void> {
    const { bdf, current, target } = device;
    if (target === undefined) return; // on vfio-pci already, because of vfiod: only the record changed hands
    const dev = addressOfBdf(bdf).path;
    await this.write(`${dev}/driver_override`, target.driver, bdf);
    if (current !== undefined) await this.write(`${dev}/driver/unbind`, bdf, bdf);
    await this.write("/sys/bus/pci/drivers_probe", bdf, bdf);
    const started = Date.now();
    for (;;) {
      const now = this.driverOf(bdf);
      if (now === target.driver && this.hasVfioNode(bdf)) break;
      const waitMs = this.deps.bindWaitMs ?? BIND_WAIT_MS;
      if (Date.now() - started > waitMs) {
        const state = now === target.driver ? `bound, but its VFIO group node did not appear` : `it is on ${now ?? "no driver"}`;
        throw new Error(`the kernel did not bind it to ${target.driver} within ${waitMs / 1000} s (${state})`);
      }
      await sleep(POLL_MS);
    }
    const detail = `${current ?? "no driver"} -> ${target.driver}${target.note === undefined ? "" : ` (${target.note})`}`;
    log.info({ device: bdf, from: current ?? null, to: target.driver, ms: Date.now() - started, note: target.note }, "managed binding: bound");
    this.deps.view.announce({ kind: "driver_bound", vm, device: deviceOf(bdf, record.id), cause: "vfiod", detail });
  }

  /** `bdf`'s record now names its device id in the VM, attach completed. */
  async attached(record: BindingRecord, id: string): Promise<void> {
    await this.save({ ...record, id, phase: "attached", since: new Date().toISOString() });
  }

  /**
   * Puts back the devices of a managed Attach that did not complete (vfiod holds
   * their group's lock): each goes back now unless a process or a VM still holds
   * it, then it waits in the background. Never throws.
   * @returns what happened to each, for the error the caller gets.
   */
  async putBack(records: readonly BindingRecord[], log: Logger): Promise<string[]> {
    const fates: string[] = [];
    for (const record of records) fates.push(await this.settle(record, log, "its attach did not complete"));
    return fates;
  }

  // ---- Detach ----

  /**
   * The hypervisor has released these devices of `vm`: each managed one gets its
   * driver back now, or once its group is closed (in the background). Never throws.
   */
  async released(vm: VmRecord, devices: readonly AttachedDevice[], log: Logger): Promise<void> {
    for (const device of devices) {
      try {
        const record = await this.recordFor(vm, device.bdf, device.id);
        if (record === undefined) continue;
        const settled = await this.underGroupLock(record.bdf, CLOSE_WAIT_MS, async () => {
          // Read again under the lock: a background look may have restored it meanwhile.
          const now = await this.deps.state.get(record.bdf);
          if (now !== undefined && sameVm(now.vm, vm)) await this.settle(now, log, "its VM released it");
          return true;
        });
        // An Attach of its group holds the lock: the background look restores it once that is done.
        if (settled === false) this.markLater(record.bdf, vm);
      } catch (err) {
        log.error({ err, device: device.bdf }, "managed binding: cannot restore a released device now; its record stays for the next start");
      }
    }
  }

  /** A DETACH_PENDING of a managed device: watched, and the message says so. */
  async pending(vm: VmRecord, err: VfiodError): Promise<VfiodError> {
    const record = await this.recordFor(vm, err.meta.device ?? "", err.meta.id ?? "");
    if (record === undefined) return err;
    const marked = await this.underGroupLock(record.bdf, CLOSE_WAIT_MS, async () => {
      await this.markReleasing(record);
      return true;
    });
    if (marked === false) this.markLater(record.bdf, vm);
    else this.kick();
    const driver = record.driver === null ? "left unbound, as it was" : `given back to ${record.driver}`;
    return new VfiodError(
      err.reason,
      `${err.message}; host device ${record.bdf} stays on ${record.boundTo} until the guest releases it, then it is ${driver}`,
      { code: err.code, meta: { ...err.meta, device: record.bdf }, cause: err },
    );
  }

  // ---- restart ----

  /** Repairs what --state-dir says an earlier vfiod left half-done; logs what it did. */
  async repair(): Promise<void> {
    const { log, state } = this.deps;
    await state.open();
    const { records, unreadable } = await state.list();
    for (const file of unreadable) log.error(file, "managed binding: a file in --state-dir is not a state record; left alone");
    for (const record of records) {
      let current: string | undefined;
      try {
        current = this.driverOf(record.bdf);
      } catch {
        current = undefined;
      }
      const exists = fs.existsSync(this.deviceDir(record.bdf));
      const fields = { device: record.bdf, driver: record.driver, phase: record.phase, vm: record.vm.name, id: record.id };
      if (!exists) {
        log.warn(fields, "managed binding: a recorded device is gone from the host; record forgotten");
        await state.forget(record.bdf);
        continue;
      }
      if (current !== undefined && isVfioDriver(current)) {
        const held = await this.heldBy(record.bdf);
        if (held !== undefined) {
          log.info({ ...fields, heldBy: held }, "managed binding: repair: device held by a process; kept for its Detach");
          continue;
        }
        if (record.phase === "binding") {
          const outcome = await this.restoreOrKeep(record, log, "repair at start: its attach never completed");
          log.info({ ...fields, outcome }, "managed binding: repair: attach never completed; driver restored");
          continue;
        }
        await this.markReleasing(record);
        log.info(fields, "managed binding: repair: attached before the restart and held by no process; restored once its VM says it let go");
        continue;
      }
      // A crash between the record and the rebind: off vfio-pci already, or on no driver at all.
      const outcome = await this.restoreOrKeep(record, log, "repair at start: the bind never completed");
      log.info({ ...fields, current: current ?? null, outcome }, "managed binding: repair: bind never completed; put back");
    }
  }

  /** Starts watching devices waiting for their VM to let go. */
  start(): void {
    this.timer = setInterval(() => this.kick(), this.deps.pollMs).unref();
    this.unsubscribe = this.deps.view.subscribe((change) => {
      // Seen leaving a VM some other way (List, the background refresh, someone else's remove).
      if (change.kind === "detached" && change.cause === "observed" && change.device.bdf !== "") {
        void this.observedRelease(change.vm, change.device.bdf);
      }
    });
    this.kick();
  }

  stop(): void {
    clearInterval(this.timer);
    this.unsubscribe?.();
  }

  /** One look at every device waiting for its VM, now (tests; the timer calls it). */
  sweep(): Promise<void> {
    this.sweeping ??= this.sweepOnce().finally(() => (this.sweeping = undefined));
    return this.sweeping;
  }

  // ---- internals ----

  private kick(): void {
    void this.sweep().catch((err: unknown) => this.deps.log.error({ err }, "managed binding: background look failed"));
  }

  private async observedRelease(vm: VmRecord, bdf: string): Promise<void> {
    const marked = await this.underGroupLock(bdf, this.deps.perVmMs, async () => {
      const record = await this.deps.state.get(bdf);
      if (record === undefined || record.phase !== "attached" || !sameVm(record.vm, vm)) return false;
      await this.markReleasing(record);
      return true;
    });
    if (marked === true) this.kick();
  }

  /**
   * Runs `fn` holding the device's IOMMU group lock (the one Attach takes), waiting
   * at most `waitMs`: every change of a record outside an Attach goes through it.
   * @returns what `fn` returned, or false when the lock was busy all that time.
   */
  private async underGroupLock<T>(bdf: string, waitMs: number, fn: () => Promise<T>): Promise<T | false> {
    try {
      return await this.deps.locks.run(groupLockKey(this.groupOf(bdf) ?? `none-${bdf}`), AbortSignal.timeout(waitMs), () => new GroupBusy(), fn);
    } catch (err) {
      if (err instanceof GroupBusy) return false;
      throw err;
    }
  }

  /** Marks `bdf`'s record "releasing" at the next sweep, under its group's lock. */
  private markLater(bdf: string, vm: VmRecord): void {
    this.toMark.set(bdf, vm);
    this.kick();
  }

  private async sweepOnce(): Promise<void> {
    for (const [bdf, vm] of [...this.toMark]) {
      const done = await this.underGroupLock(bdf, this.deps.perVmMs, async () => {
        const record = await this.deps.state.get(bdf);
        // Still that VM's (no Attach took it over meanwhile), and its attach had completed.
        if (record !== undefined && sameVm(record.vm, vm) && record.phase !== "binding") await this.markReleasing(record);
        return true;
      });
      if (done === true) this.toMark.delete(bdf);
    }
    const { records } = await this.deps.state.list();
    const byVm = new Map<string, BindingRecord[]>();
    for (const record of records.filter((r) => r.phase === "releasing")) {
      const key = vmKey(record.vm);
      byVm.set(key, [...(byVm.get(key) ?? []), record]);
    }
    await Promise.all([...byVm].filter(([key]) => !this.looking.has(key)).map(([key, waiting]) => this.look(key, waiting)));
  }

  /** Asks the VM whether it still holds its managed devices; restores those it let go. */
  private async look(key: string, waiting: BindingRecord[]): Promise<void> {
    const { log, backends, view, perVmMs } = this.deps;
    this.looking.add(key);
    try {
      const due = waiting.filter((record) => (this.retries.get(record.bdf)?.at ?? 0) <= Date.now());
      if (due.length === 0) return;
      const vm = (await this.deps.inventory.records()).find((r) => vmKey(r) === key);
      let held: readonly AttachedDevice[] = [];
      if (vm !== undefined && vm.notRunning === undefined) {
        try {
          held = await backends.lister(vm.hypervisor).list(vm, AbortSignal.timeout(perVmMs));
          view.observed(vm, held);
        } catch (err) {
          for (const record of due) {
            if (this.unanswered.has(record.bdf)) continue;
            this.unanswered.add(record.bdf);
            log.warn({ device: record.bdf, vm: vm.id, why: (err as Error).message }, "managed binding: cannot ask the VM whether it released a device; asking again");
          }
          return;
        }
      }
      for (const record of due) {
        this.unanswered.delete(record.bdf);
        if (held.some((d) => d.bdf === record.bdf)) continue;
        // Busy: an Attach of its group is in progress; the next look tries again.
        await this.underGroupLock(record.bdf, perVmMs, async () => {
          const now = await this.deps.state.get(record.bdf);
          // Another managed Attach took it over meanwhile: not this look's.
          if (now === undefined || now.phase !== "releasing" || !sameVm(now.vm, record.vm)) return;
          await this.settle(now, log, "its VM released it", 0);
        });
      }
    } finally {
      this.looking.delete(key);
    }
  }

  /**
   * Restores the record's driver unless something still holds the device (then
   * it waits, "releasing", for the background look). Never throws.
   * @param closeWaitMs how long a process that just let go may take to close the group node.
   */
  private async settle(record: BindingRecord, log: Logger, why: string, closeWaitMs = CLOSE_WAIT_MS): Promise<string> {
    const started = Date.now();
    const holder = await this.holderAfter(record, closeWaitMs);
    if (holder !== undefined) {
      await this.markReleasing(record);
      log.info({ device: record.bdf, heldBy: holder, why }, "managed binding: still held; restored once released");
      return `${record.bdf} kept on ${record.boundTo} while ${holder} holds it; restored once released`;
    }
    // How long the hypervisor's process took to close the group after it said it let go.
    return this.restoreOrKeep(record, log.child({ closedAfterMs: Date.now() - started }), why);
  }

  /** Restores now; a restore the kernel refuses is retried later. Never throws. */
  private async restoreOrKeep(record: BindingRecord, log: Logger, why: string): Promise<string> {
    try {
      return await this.restore(record, log, why);
    } catch (err) {
      const failures = (this.retries.get(record.bdf)?.failures ?? 0) + 1;
      const waitMs = Math.min(RETRY_MAX_MS, this.deps.pollMs * 2 ** failures);
      this.retries.set(record.bdf, { failures, at: Date.now() + waitMs });
      await this.markReleasing(record).catch(() => undefined);
      log.error({ device: record.bdf, driver: record.driver, err, retryInMs: waitMs }, "managed binding: restoring the host driver failed; retrying");
      return `${record.bdf}: restoring ${record.driver ?? "no driver"} failed (${(err as Error).message}); vfiod retries`;
    }
  }

  /**
   * The kernel's restore (libvirt's virPCIDeviceUnbindFromStub): driver_override
   * cleared, unbound from its VFIO driver, reprobed so the kernel picks the
   * device's own driver; a device that had none is left unbound. The record is
   * forgotten once done.
   */
  private async restore(record: BindingRecord, log: Logger, why: string): Promise<string> {
    const { bdf } = record;
    const dev = addressOfBdf(bdf).path;
    const current = this.driverOf(bdf);
    const started = Date.now();
    await this.write(`${dev}/driver_override`, "\n", bdf);
    if (current !== undefined && !isVfioDriver(current)) {
      // Not on a VFIO driver (a crash before the unbind, or someone else's doing): not vfiod's to move.
      await this.forget(bdf);
      const note = current === record.driver ? `${bdf} still on ${current}` : `${bdf} is on ${current} (it had ${record.driver ?? "none"}); left there`;
      log.info({ device: bdf, driver: current, why }, `managed binding: ${note}; record forgotten`);
      return note;
    }
    if (current !== undefined) await this.write(`${dev}/driver/unbind`, bdf, bdf);
    let now: string | undefined;
    if (record.driver !== null) {
      await this.write("/sys/bus/pci/drivers_probe", bdf, bdf);
      // Some drivers probe asynchronously: wait, bounded, for one to claim it.
      for (;;) {
        now = this.driverOf(bdf);
        if ((now !== undefined && now !== current) || Date.now() - started > (this.deps.bindWaitMs ?? REBIND_WAIT_MS)) break;
        await sleep(POLL_MS);
      }
    }
    await this.forget(bdf);
    const from = current ?? "no driver";
    const to = now ?? "no driver";
    const detail = `${from} -> ${to}${record.driver !== null && now !== record.driver ? ` (it had ${record.driver})` : ""}`;
    const level = record.driver !== null && now !== record.driver ? "warn" : "info";
    log[level]({ device: bdf, from: current ?? null, to: now ?? null, had: record.driver, ms: Date.now() - started, why }, "managed binding: driver restored");
    this.deps.view.announce({ kind: "driver_restored", vm: vmOf(record), device: deviceOf(bdf, record.id), cause: "vfiod", detail });
    return `${bdf} ${detail}`;
  }

  /** Who holds the device's group or cdev open, waiting up to `waitMs` for it to let go; also a VM vfiod knows holds it. */
  private async holderAfter(record: BindingRecord, waitMs: number): Promise<string | undefined> {
    const until = Date.now() + waitMs;
    for (;;) {
      const known = this.deps.view.holdersOf(record.bdf)[0];
      const held = known === undefined ? await this.heldBy(record.bdf) : `VM ${known.known.vm.name}`;
      if (held === undefined || Date.now() >= until) return held;
      await sleep(100);
    }
  }

  /** The process holding the device's VFIO nodes open, in words, or undefined. */
  private async heldBy(bdf: string): Promise<string | undefined> {
    const { holders } = this.deps;
    if (!holders.canSeeOthers()) return "a process vfiod cannot see (it cannot read other processes' open files)";
    const { nodes } = await holders.nodesOf(addressOfBdf(bdf));
    const [process] = await holders.holders(nodes, AbortSignal.timeout(this.deps.perVmMs));
    return process === undefined ? undefined : `process ${process.pid} (${process.command})`;
  }

  private async recordFor(vm: VmRecord, bdf: string, id: string): Promise<BindingRecord | undefined> {
    if (bdf !== "") {
      const record = await this.deps.state.get(bdf);
      return record !== undefined && sameVm(record.vm, vm) ? record : undefined;
    }
    if (id === "") return undefined;
    const { records } = await this.deps.state.list();
    return records.find((r) => sameVm(r.vm, vm) && r.id === id);
  }

  private async markReleasing(record: BindingRecord): Promise<void> {
    const now = await this.deps.state.get(record.bdf);
    if (now === undefined || now.phase === "releasing") return;
    await this.save({ ...now, id: now.id || record.id, phase: "releasing", since: new Date().toISOString() });
  }

  private async save(record: BindingRecord): Promise<void> {
    try {
      await this.deps.state.save(record);
    } catch (err) {
      throw new Error(`cannot record it in --state-dir ${this.deps.state.dir}: ${(err as Error).message}`, { cause: err });
    }
  }

  private async forget(bdf: string): Promise<void> {
    await this.deps.state.forget(bdf);
    this.retries.delete(bdf);
    this.unanswered.delete(bdf);
  }

  private async write(file: string, value: string, bdf: string): Promise<void> {
    try {
      await this.deps.writer.write(file, value);
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      throw new Error(`writing ${JSON.stringify(value.trim() || "\\n")} to ${file} failed for ${bdf}: ${code ?? (err as Error).message}`, {
        cause: err,
      });
    }
  }

  private deviceDir(bdf: string): string {
    return path.join(pciDevicesDir(this.deps.sysfsRoot), bdf);
  }

  private driverOf(bdf: string): string | undefined {
    return readLinkName(path.join(this.deviceDir(bdf), "driver"));
  }

  private groupOf(bdf: string): string | undefined {
    return readLinkName(path.join(this.deviceDir(bdf), "iommu_group"));
  }

  /** /dev/vfio/<group> or a cdev under vfio-dev/ exists. */
  private hasVfioNode(bdf: string): boolean {
    const group = this.groupOf(bdf);
    if (group !== undefined && fs.existsSync(path.join(this.deps.sysfsRoot, "dev/vfio", group))) return true;
    try {
      return fs.readdirSync(path.join(this.deviceDir(bdf), "vfio-dev")).length > 0;
    } catch {
      return false; // no cdev: not bound to a VFIO driver, or a kernel without device cdevs
    }
  }
}

/**
 * The devices of one managed Attach, checked and not yet touched. apply() binds
 * them (under the VM's lock, just before the hypervisor is asked).
 */
export class BindPlan {
  constructor(
    private readonly binding: ManagedBinding,
    private readonly devices: readonly PlannedDevice[],
  ) {}

  /**
   * Records and binds every device that needs it, in order; on any failure puts
   * back those it touched and refuses.
   * @throws DEVICE_NOT_VFIO naming the device, why, and what was put back.
   */
  async apply(vm: VmRecord, primary: { bdf: string; id: string }, log: Logger): Promise<BoundDevices> {
    const touched: BindingRecord[] = [];
    for (const device of this.devices) {
      // On a VFIO driver, and not because of vfiod: nothing to do, nothing to restore.
      if (device.target === undefined && device.prior === undefined) continue;
      const record: BindingRecord = {
        version: 1,
        bdf: device.bdf,
        // A device vfiod bound before (still on vfio-pci) keeps the driver it had then.
        driver: device.target === undefined ? (device.prior?.driver ?? null) : (device.current ?? device.prior?.driver ?? null),
        boundTo: device.target?.driver ?? device.current ?? "vfio-pci",
        vm: { id: vm.id, name: vm.name, source: vm.source, hypervisor: vm.hypervisor, socket: vm.socket },
        id: device.bdf === primary.bdf ? primary.id : "",
        phase: "binding",
        since: new Date().toISOString(),
      };
      try {
        await this.binding.record(record);
        // Recorded: from here on, a failure (or a crash) puts it back.
        touched.push(record);
        await this.binding.bind(device, record, vm, log);
      } catch (err) {
        const fates = await this.binding.putBack(touched, log);
        throw new VfiodError(
          "DEVICE_NOT_VFIO",
          `managed binding of host PCI device ${device.bdf} to ${record.boundTo} failed: ${(err as Error).message}; ` +
            `put back: ${fates.length === 0 ? "nothing had changed" : fates.join("; ")}`,
          { meta: { device: device.bdf }, cause: err },
        );
      }
    }
    return new BoundDevices(this.binding, touched);
  }
}

/** What a managed Attach bound (or took over), until it completes or fails. */
export class BoundDevices {
  constructor(
    private readonly binding: ManagedBinding,
    private readonly records: readonly BindingRecord[],
  ) {}

  /** The attach completed: each record now names its device's id in the VM. */
  async attached(devices: readonly AttachedDevice[], log: Logger): Promise<void> {
    for (const record of this.records) {
      const device = devices.find((d) => d.bdf === record.bdf);
      try {
        await this.binding.attached(record, device?.id ?? record.id);
      } catch (err) {
        // The "binding" record stays: a restart keeps it while the VM holds the device.
        log.error({ err, device: record.bdf }, "managed binding: cannot mark the device attached in --state-dir");
      }
    }
  }

  /** The attach failed: puts every device back, and tells the caller in `err`'s message. */
  async undo(err: unknown, log: Logger): Promise<unknown> {
    if (this.records.length === 0) return err;
    const fates = await this.binding.putBack(this.records, log);
    if (!(err instanceof VfiodError)) {
      log.error({ fates }, "managed binding: attach failed; host drivers put back");
      return err;
    }
    return new VfiodError(err.reason, `${err.message}; host drivers: ${fates.join("; ")}`, {
      code: err.code,
      meta: err.meta,
      cause: err,
    });
  }
}

/** Another operation holds the device's IOMMU group lock. */
class GroupBusy extends Error {}

function vmOf(record: BindingRecord): VmRecord {
  return { ...record.vm };
}

function deviceOf(bdf: string, id: string): AttachedDevice {
  return { id, ...addressOfBdf(bdf), guestBdf: "" };
}

/** Without --manage-binding: says so when --state-dir still names devices an earlier vfiod bound. */
export async function warnUnmanaged(stateDir: string, log: Logger): Promise<void> {
  const { records } = await new BindingState(stateDir).list().catch(() => ({ records: [] as BindingRecord[] }));
  if (records.length === 0) return;
  log.warn(
    { stateDir, devices: records.map((r) => `${r.bdf} (had ${r.driver ?? "no driver"}, for VM ${r.vm.name})`) },
    "--state-dir names devices a vfiod with --manage-binding bound to vfio-pci; without it, their drivers are not restored",
  );
}
