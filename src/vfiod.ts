// vfiod's parts, wired once: the process (main.ts) and in-process tests build
// the same thing from the same options.
import os from "node:os";
import { defaultBackends } from "./backends/all";
import type { BackendRegistry } from "./backends/registry";
import type { DeviceAllowList } from "./host/device-allow-list";
import { BindingState } from "./host/binding-state";
import { HostUseCheck } from "./host/host-use";
import { HostPreflight } from "./host/preflight";
import { RootedSysfsWriter, type SysfsWriter } from "./host/sysfs-writer";
import { VfioDriverChooser } from "./host/vfio-driver";
import { VfioHolders } from "./host/vfio-holders";
import type { CocoonBinaries } from "./inventory/cocoon";
import { Inventory } from "./inventory/inventory";
import { KeyedLocks } from "./keyed-locks";
import type { Logger } from "./log";
import { DEFAULT_HYPERVISOR_TIMEOUT_MS } from "./request-bound";
import { createVfiodServer, type VfiodServer, type VfiodServerOptions } from "./grpc/server";
import { DeviceOperations } from "./service/device-operations";
import { DeviceWatch } from "./service/device-watch";
import { HeldElsewhere } from "./service/held-elsewhere";
import { InventoryQueries } from "./service/inventory-queries";
import { ManagedBinding } from "./service/managed-binding";
import { DeviceView } from "./view/device-view";
import { Refresher } from "./view/refresher";

export interface VfiodOptions {
  readonly log: Logger;
  readonly inventoryFile?: string;
  readonly cocoonRoot?: string;
  readonly cocoonBinaries?: CocoonBinaries;
  /** Where sys/ and dev/vfio are read ("/"). */
  readonly sysfsRoot: string;
  /** Where /proc is read ("/proc"). */
  readonly procRoot?: string;
  /** Host kernel release for the group viability rule (default: this machine's). */
  readonly kernelRelease?: string;
  readonly detachTimeoutMs: number;
  readonly hypervisorTimeoutMs?: number;
  /** Between background refreshes of what each VM holds. */
  readonly refreshIntervalMs?: number;
  readonly allowList?: DeviceAllowList;
  /** Default: every backend vfiod has. */
  readonly backends?: BackendRegistry;
  readonly server?: VfiodServerOptions;
  /** --manage-binding: managed Attach binds devices to vfio-pci; undefined: BINDING_DISABLED. */
  readonly binding?: ManagedBindingOptions;
}

export interface ManagedBindingOptions {
  /** --state-dir. */
  readonly stateDir: string;
  /** Default: writes under sysfsRoot. Tests record every write and play the kernel's part. */
  readonly writer?: SysfsWriter;
  /** Between two looks at devices whose removal is pending (default 2 s). */
  readonly pollMs?: number;
  /** How long the kernel may take to bind a device (default 10 s). */
  readonly bindWaitMs?: number;
}

/** A refresh pass reads this many VMs at once... */
const REFRESH_CONCURRENCY = 4;
/** ...each within this bound: a VM slower than this is noted unreachable until it answers. */
const REFRESH_PER_VM_MS = 5_000;
export const DEFAULT_REFRESH_INTERVAL_MS = 30_000;

export interface Vfiod {
  readonly server: VfiodServer;
  readonly operations: DeviceOperations;
  readonly view: DeviceView;
  readonly refresher: Refresher;
  readonly watch: DeviceWatch;
  readonly inventory: Inventory;
  readonly holders: VfioHolders;
  /** With --manage-binding. */
  readonly binding?: ManagedBinding;
}

export function assembleVfiod(options: VfiodOptions): Vfiod {
  const { log } = options;
  const hypervisorTimeoutMs = options.hypervisorTimeoutMs ?? DEFAULT_HYPERVISOR_TIMEOUT_MS;
  const metrics = options.server?.metrics;
  const backends = options.backends ?? defaultBackends(hypervisorTimeoutMs, metrics?.observeHypervisorCall);
  const inventory = new Inventory({
    inventoryFile: options.inventoryFile,
    cocoonRoot: options.cocoonRoot,
    cocoonBinaries: options.cocoonBinaries,
    procRoot: options.procRoot,
    hypervisors: new Set(backends.kinds()),
    log,
  });
  const view = new DeviceView();
  const holders = new VfioHolders(options.procRoot ?? "/proc", options.sysfsRoot, log);
  const preflight = new HostPreflight(options.sysfsRoot, options.kernelRelease);
  const heldElsewhere = new HeldElsewhere({ kernel: holders, view, records: () => inventory.records() });
  const locks = new KeyedLocks();
  const binding =
    options.binding === undefined
      ? undefined
      : new ManagedBinding({
          sysfsRoot: options.sysfsRoot,
          writer: options.binding.writer ?? new RootedSysfsWriter(options.sysfsRoot),
          state: new BindingState(options.binding.stateDir),
          drivers: new VfioDriverChooser(options.sysfsRoot, options.kernelRelease ?? os.release()),
          hostUse: new HostUseCheck(options.sysfsRoot, options.procRoot ?? "/proc", holders),
          holders,
          view,
          locks,
          inventory,
          backends,
          log,
          pollMs: options.binding.pollMs ?? 2_000,
          bindWaitMs: options.binding.bindWaitMs,
          perVmMs: Math.min(REFRESH_PER_VM_MS, hypervisorTimeoutMs),
        });
  const operations = new DeviceOperations({
    inventory,
    backends,
    host: preflight,
    heldElsewhere,
    view,
    locks,
    detachTimeoutMs: options.detachTimeoutMs,
    opsLockWaitMs: hypervisorTimeoutMs,
    allowList: options.allowList,
    binding,
  });
  const refresher = new Refresher({
    inventory,
    backends,
    view,
    log,
    intervalMs: options.refreshIntervalMs ?? DEFAULT_REFRESH_INTERVAL_MS,
    perVmMs: Math.min(REFRESH_PER_VM_MS, hypervisorTimeoutMs),
    concurrency: REFRESH_CONCURRENCY,
  });
  const queries = new InventoryQueries({
    inventory,
    backends,
    preflight,
    holders,
    heldElsewhere,
    view,
    allowList: options.allowList,
    sysfsRoot: options.sysfsRoot,
  });
  const watch = new DeviceWatch({ inventory, backends, view });
  const server = createVfiodServer(operations, watch, queries, log, options.server);
  metrics?.readFrom({
    vmDevices: () => view.all().map((known) => ({ vm: known.vm.id, devices: known.devices.length })),
    inventorySize: async () => {
      const records = await inventory.records();
      return (["inventory", "cocoon"] as const).map((source) => ({ source, vms: records.filter((vm) => vm.source === source).length }));
    },
    queues: () => backends.queues(),
  });
  return { server, operations, view, refresher, watch, inventory, holders, binding };
}
