// Watch, independent of gRPC: Kubernetes' list-then-watch shape (../shared/style.md
// item 14). First one PRESENT event per device already attached (to the VM, or to
// every VM), then SYNCED, then every change vfiod learns of, as it happens: its own
// attaches and detaches, removals that complete later, bindings, and devices found
// attached or removed by someone else (the background refresh and any List).
//
// A watcher never slows a mutation: changes go into its own bounded queue; one that
// falls behind (its client stops reading) is ended with RESOURCE_EXHAUSTED and may
// watch again.
import type { AttachedDevice } from "../backends/backend";
import type { BackendRegistry } from "../backends/registry";
import { VfiodError } from "../errors";
import type { VmRecord } from "../inventory/vm";
import { sameVm, type DeviceChange, type DeviceView } from "../view/device-view";
import type { Call } from "./call";

export type WatchKind = "present" | "synced" | DeviceChange["kind"];

export interface WatchedEvent {
  readonly kind: WatchKind;
  /** VM id; "" for SYNCED. */
  readonly vm: string;
  readonly device: AttachedDevice | undefined;
  readonly time: Date;
  readonly detail: string;
}

/** Where events go: false means "full, wait for drained()". */
export interface WatchSink {
  write(event: WatchedEvent): boolean;
  drained(): Promise<void>;
}

export interface DeviceWatchDeps {
  readonly inventory: { resolve(ref: string): Promise<VmRecord>; all(): Promise<VmRecord[]> };
  readonly backends: BackendRegistry;
  readonly view: DeviceView;
}

/** Changes a watcher may have waiting before it counts as fallen behind. */
export const WATCH_QUEUE_LIMIT = 256;
/** How long the snapshot waits for one VM before using what vfiod last read of it. */
const SNAPSHOT_PER_VM_MS = 5_000;
/** VMs read at once for a snapshot of every VM. */
const SNAPSHOT_CONCURRENCY = 8;

export class DeviceWatch {
  /** Ends each watch running now (at shutdown). */
  private readonly running = new Set<() => void>();

  constructor(private readonly deps: DeviceWatchDeps) {}

  /** Watches running now. */
  count(): number {
    return this.running.size;
  }

  /** Ends every watch with UNAVAILABLE (SHUTTING_DOWN): its client may watch again elsewhere or later. */
  closeAll(): void {
    for (const close of [...this.running]) close();
  }

  /**
   * Streams events to `sink` until the caller goes away.
   * @throws INVALID_ARGUMENT, VM_NOT_FOUND, VM_AMBIGUOUS (before anything is sent);
   *   WATCHER_BEHIND (RESOURCE_EXHAUSTED) when the watcher falls behind.
   */
  async watch(request: { vm: string }, call: Call, sink: WatchSink): Promise<void> {
    const target = request.vm === "" ? undefined : await this.deps.inventory.resolve(request.vm);
    if (target !== undefined) {
      call.facts.vm = target.id;
      call.facts.vmName = target.name;
    }
    const queue: DeviceChange[] = [];
    let behind = false;
    let fallBehind!: () => void;
    const fellBehind = new Promise<void>((resolve) => (fallBehind = resolve));
    let wake: (() => void) | undefined;
    // Subscribe before the snapshot is read, so nothing between the two is lost.
    const unsubscribe = this.deps.view.subscribe((change) => {
      if (target !== undefined && !sameVm(change.vm, target)) return;
      if (queue.length < WATCH_QUEUE_LIMIT) queue.push(change);
      else if (!behind) {
        behind = true;
        fallBehind();
      }
      wake?.();
    });
    let closing = false;
    let stop!: () => void;
    const stopped = new Promise<void>((resolve) => (stop = resolve));
    if (call.signal.aborted) stop();
    else call.signal.addEventListener("abort", () => stop(), { once: true });
    const close = () => {
      closing = true;
      stop();
    };
    this.running.add(close);
    try {
      // Writes one event; while the client is slow, waits for it, but not past the queue's bound.
      const send = async (event: WatchedEvent) => {
        if (sink.write(event)) return;
        await Promise.race([sink.drained(), fellBehind, stopped]);
        if (behind) throw fallenBehind();
      };
      const snapshot = await this.snapshot(target, call.signal);
      for (const event of snapshot) await send(event);
      await send({ kind: "synced", vm: "", device: undefined, time: new Date(), detail: "" });
      // Changes that raced the snapshot and are already in it are not told twice.
      const inSnapshot = new Set(snapshot.map((event) => `${event.vm}\0${event.device?.id}\0${event.device?.bdf}`));
      let catchingUp = queue.length;
      while (!call.signal.aborted) {
        if (closing) throw new VfiodError("SHUTTING_DOWN", "vfiod is shutting down: watch again once it serves");
        if (behind) throw fallenBehind();
        const change = queue.shift();
        if (change === undefined) {
          await Promise.race([stopped, new Promise<void>((resolve) => (wake = resolve))]);
          wake = undefined;
          continue;
        }
        const key = `${change.vm.id}\0${change.device.id}\0${change.device.bdf}`;
        const stale = catchingUp-- > 0 && (change.kind === "attached" ? inSnapshot.has(key) : change.kind === "detached" && !inSnapshot.has(key));
        if (stale) continue;
        await send(toEvent(change));
      }
    } finally {
      unsubscribe();
      this.running.delete(close);
    }
  }

  /** PRESENT events: each VM read now, or, when it does not answer in time, what vfiod last read of it. */
  private async snapshot(target: VmRecord | undefined, signal: AbortSignal): Promise<WatchedEvent[]> {
    const vms = target !== undefined ? [target] : await this.deps.inventory.all();
    const events: WatchedEvent[][] = [];
    const queue = [...vms.entries()];
    const worker = async () => {
      for (let next = queue.shift(); next !== undefined; next = queue.shift()) {
        const [index, vm] = next;
        events[index] = await this.present(vm, signal);
      }
    };
    await Promise.all(Array.from({ length: Math.min(SNAPSHOT_CONCURRENCY, queue.length) }, worker));
    return events.flat();
  }

  private async present(vm: VmRecord, signal: AbortSignal): Promise<WatchedEvent[]> {
    if (vm.notRunning !== undefined) return [];
    let devices: readonly AttachedDevice[];
    let detail = "read now";
    try {
      devices = await this.deps.backends.lister(vm.hypervisor).list(vm, AbortSignal.any([signal, AbortSignal.timeout(SNAPSHOT_PER_VM_MS)]));
      this.deps.view.observed(vm, devices);
    } catch (err) {
      const known = this.deps.view.get(vm);
      devices = known?.devices ?? [];
      const why = err instanceof Error ? err.message : String(err);
      const when = known === undefined ? "never read" : `last read ${Math.round((Date.now() - known.knownAt) / 1000)} s ago`;
      detail = `as vfiod last knew it (${when}): ${why}`;
    }
    const time = new Date();
    return devices.map((device) => ({ kind: "present", vm: vm.id, device, time, detail }));
  }
}

function toEvent(change: DeviceChange): WatchedEvent {
  const who = change.cause === "vfiod" ? "by vfiod" : "found in the VM's answer";
  return {
    kind: change.kind,
    vm: change.vm.id,
    device: change.device,
    time: new Date(),
    detail: change.detail === undefined ? who : `${who}: ${change.detail}`,
  };
}

function fallenBehind(): VfiodError {
  return new VfiodError(
    "WATCHER_BEHIND",
    `the watcher fell behind (more than ${WATCH_QUEUE_LIMIT} events waiting): watch again to get a fresh snapshot`,
  );
}
