// What vfiod knows each VM holds, without asking it now (client-go's informer,
// ../shared/style.md item 13): the last answer each VM's hypervisor gave (a List,
// a background refresh) and vfiod's own attaches and detaches since. It answers
// "which other VM holds this device?" in O(1), whatever the number of VMs, and
// covers what the kernel cannot see: a device configured in a VM that has not
// opened it yet (a created, not booted, Cloud Hypervisor VM).
//
// Each VM's knowledge has its own age: a VM that stops answering makes only its
// own entry stale, and keeps its last answer (a device it held may still be held).
import type { AttachedDevice } from "../backends/backend";
import type { VmRecord } from "../inventory/vm";

/** One VM as vfiod last knew it. */
export interface KnownVm {
  readonly vm: VmRecord;
  readonly devices: readonly AttachedDevice[];
  /** When a hypervisor answer or vfiod's own mutation last set `devices` (ms since epoch). */
  readonly knownAt: number;
  /** Why the last read failed, when it did (the devices are then older than that read). */
  readonly unreachable?: string;
}

/**
 * A change vfiod learnt of: from its own mutation, or by comparing two answers of
 * the VM (vfiod.v1.WatchEvent.Kind, without the snapshot's PRESENT and SYNCED).
 */
export interface DeviceChange {
  readonly kind: "attached" | "detach_requested" | "detach_pending" | "detached" | "driver_bound" | "driver_restored";
  readonly vm: VmRecord;
  readonly device: AttachedDevice;
  /** "vfiod": its own Attach or Detach; "observed": found in the VM's answer (someone else, or a pending removal that completed). */
  readonly cause: "vfiod" | "observed";
  /** Free text for people: which driver, how long the guest took, ... */
  readonly detail?: string;
}

export type ChangeListener = (change: DeviceChange) => void;

/** The key of a VM across sources: the same id may come from the static file and cocoon. */
export function vmKey(vm: Pick<VmRecord, "source" | "id">): string {
  return `${vm.source}/${vm.id}`;
}

/** Whether two records (or a state file's copy of one) are the same VM. */
export function sameVm(a: Pick<VmRecord, "source" | "id">, b: Pick<VmRecord, "source" | "id">): boolean {
  return vmKey(a) === vmKey(b);
}

const sameDevice = (a: AttachedDevice, b: AttachedDevice) => a.id === b.id && a.bdf === b.bdf;

export class DeviceView {
  private readonly vms = new Map<string, KnownVm>();
  /** Host BDF -> keys of the VMs known to hold it. */
  private readonly byBdf = new Map<string, Set<string>>();
  private readonly listeners = new Set<ChangeListener>();

  /** A fresh answer from the VM's hypervisor: what it holds now. */
  observed(vm: VmRecord, devices: readonly AttachedDevice[], at = Date.now()): void {
    const before = this.vms.get(vmKey(vm))?.devices ?? [];
    this.set({ vm, devices, knownAt: at });
    for (const gone of before.filter((d) => !devices.some((now) => sameDevice(d, now)))) {
      this.emit({ kind: "detached", vm, device: gone, cause: "observed" });
    }
    for (const added of devices.filter((d) => !before.some((was) => sameDevice(d, was)))) {
      this.emit({ kind: "attached", vm, device: added, cause: "observed" });
    }
  }

  /** The VM did not answer: keep what it held, say since when vfiod does not know better. */
  unreachable(vm: VmRecord, why: string): void {
    const known = this.vms.get(vmKey(vm));
    this.set({ vm, devices: known?.devices ?? [], knownAt: known?.knownAt ?? 0, unreachable: why });
  }

  /**
   * vfiod attached `device` to `vm`. Told to watchers unless an answer of the VM
   * (a background read racing the attach) already showed it.
   */
  attached(vm: VmRecord, device: AttachedDevice): void {
    const known = this.vms.get(vmKey(vm));
    const others = (known?.devices ?? []).filter((d) => d.id !== device.id);
    const seen = known?.devices.some((d) => sameDevice(d, device)) === true;
    this.set({ vm, devices: [...others, device], knownAt: Date.now() });
    if (!seen) this.emit({ kind: "attached", vm, device, cause: "vfiod" });
  }

  /**
   * The guest released `device` after vfiod's Detach. Told to watchers unless an
   * answer of the VM (a background read racing the detach) already showed it gone.
   */
  detached(vm: VmRecord, device: AttachedDevice): void {
    const known = this.vms.get(vmKey(vm));
    const held = known?.devices.find((d) => d.id === device.id);
    this.set({ vm, devices: (known?.devices ?? []).filter((d) => d.id !== device.id), knownAt: Date.now() });
    if (held !== undefined) this.emit({ kind: "detached", vm, device: held, cause: "vfiod" });
  }

  /** The VMs (other than `except`) that vfiod knows to hold host device `bdf`. */
  holdersOf(bdf: string, except?: VmRecord): { known: KnownVm; device: AttachedDevice }[] {
    const skip = except === undefined ? undefined : vmKey(except);
    const keys = [...(this.byBdf.get(bdf) ?? [])].filter((key) => key !== skip);
    return keys.flatMap((key) => {
      const known = this.vms.get(key);
      const device = known?.devices.find((d) => d.bdf === bdf);
      return known === undefined || device === undefined ? [] : [{ known, device }];
    });
  }

  get(vm: VmRecord): KnownVm | undefined {
    return this.vms.get(vmKey(vm));
  }

  all(): KnownVm[] {
    return [...this.vms.values()];
  }

  /** Forgets VMs no longer in any inventory source. */
  retain(vms: readonly VmRecord[]): void {
    const keep = new Set(vms.map(vmKey));
    for (const [key, known] of this.vms) if (!keep.has(key)) this.set({ ...known, devices: [] }, true);
  }

  /**
   * Tells watchers of a change that does not alter what the VM holds: a removal
   * requested or still pending, a host driver bound or restored.
   */
  announce(change: DeviceChange): void {
    this.emit(change);
  }

  /** Calls `listener` for every change from now on; returns the unsubscribe function. */
  subscribe(listener: ChangeListener): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  private set(known: KnownVm, forget = false): void {
    const key = vmKey(known.vm);
    for (const device of this.vms.get(key)?.devices ?? []) {
      const holders = this.byBdf.get(device.bdf);
      holders?.delete(key);
      if (holders?.size === 0) this.byBdf.delete(device.bdf);
    }
    if (forget) {
      this.vms.delete(key);
      return;
    }
    this.vms.set(key, known);
    for (const device of known.devices) {
      if (device.bdf === "") continue;
      let holders = this.byBdf.get(device.bdf);
      if (holders === undefined) this.byBdf.set(device.bdf, (holders = new Set()));
      holders.add(key);
    }
  }

  private emit(change: DeviceChange): void {
    for (const listener of [...this.listeners]) listener(change);
  }
}
