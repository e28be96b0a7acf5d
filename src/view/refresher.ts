// Keeps the device view fresh in the background: every interval, each running VM
// vfiod can see is listed through its backend (so within the same connection
// limits and shared reads as callers), a few at a time, each within its own bound.
// A VM that does not answer is noted unreachable and keeps its last answer; a VM
// still being read from the last pass is not asked again, so a wedged VMM costs
// one waiting read, never a pile of them, and delays no other VM.
import type { BackendRegistry } from "../backends/registry";
import { VfiodError } from "../errors";
import type { VmRecord } from "../inventory/vm";
import type { Logger } from "../log";
import { type DeviceView, vmKey } from "./device-view";

export interface RefresherOptions {
  readonly inventory: { all(): Promise<VmRecord[]> };
  readonly backends: BackendRegistry;
  readonly view: DeviceView;
  readonly log: Logger;
  /** Between the starts of two passes. */
  readonly intervalMs: number;
  /** How long one VM may take to answer. */
  readonly perVmMs: number;
  /** VMs read at once. */
  readonly concurrency: number;
}

export class Refresher {
  private timer: NodeJS.Timeout | undefined;
  private readonly reading = new Set<string>();
  private pass: Promise<void> | undefined;

  constructor(private readonly options: RefresherOptions) {}

  /** Starts passes every interval (the first at once). */
  start(): void {
    const tick = () => {
      this.pass ??= this.refreshAll().finally(() => (this.pass = undefined));
    };
    tick();
    this.timer = setInterval(tick, this.options.intervalMs).unref();
  }

  stop(): void {
    clearInterval(this.timer);
  }

  /** One pass over every VM vfiod can see. */
  async refreshAll(): Promise<void> {
    const { inventory, view, log, concurrency } = this.options;
    let vms: VmRecord[];
    try {
      vms = await inventory.all();
    } catch (err) {
      log.error({ err }, "background refresh: cannot read the VM inventory");
      return;
    }
    view.retain(vms);
    const queue = vms.filter((vm) => !this.reading.has(vmKey(vm)));
    const worker = async () => {
      for (let vm = queue.shift(); vm !== undefined; vm = queue.shift()) await this.refresh(vm);
    };
    await Promise.all(Array.from({ length: Math.min(concurrency, queue.length) }, worker));
  }

  /** Reads one VM into the view. */
  async refresh(vm: VmRecord): Promise<void> {
    const { backends, view, log, perVmMs } = this.options;
    if (vm.notRunning !== undefined) {
      // VFIO attach is runtime-only: a VM that is not running holds nothing.
      view.observed(vm, []);
      return;
    }
    const key = vmKey(vm);
    this.reading.add(key);
    try {
      const lister = backends.lister(vm.hypervisor);
      view.observed(vm, await lister.list(vm, AbortSignal.timeout(perVmMs)));
    } catch (err) {
      if (err instanceof VfiodError && err.reason === "BACKEND_UNSUPPORTED") return;
      const why = err instanceof Error ? err.message : String(err);
      if (view.get(vm)?.unreachable === undefined) log.warn({ vm: vm.id, vmName: vm.name, why }, "background refresh: VM did not answer; vfiod keeps what it last knew");
      view.unreachable(vm, why);
    } finally {
      this.reading.delete(key);
    }
  }
}
