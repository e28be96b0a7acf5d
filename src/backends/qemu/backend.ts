// QEMU backend: hot-plugs vfio-pci devices over QMP onto free pcie-root-ports
// (../shared/reference/qemu-qmp.md §3-§5). QEMU serves one monitor client at a
// time (§1), so each operation is one short session; this backend is the one
// owner of every monitor socket: operations on one socket queue here in arrival
// order instead of finding the monitor busy, and concurrent Lists of one VM share
// one session sent after they arrived.
import { setTimeout as sleep } from "node:timers/promises";
import { abortedError, type Reason, VfiodError } from "../../errors";
import { FreshReads } from "../../fresh-reads";
import type { VmRecord } from "../../inventory/vm";
import { KeyedLocks } from "../../keyed-locks";
import { addressOfBdf, isCanonicalBdf, type PciAddress } from "../../pci/address";
import { observed, unobserved, type HypervisorCallObserver } from "../../hypervisor-calls";
import { DEFAULT_HYPERVISOR_TIMEOUT_MS, withinBound } from "../../request-bound";
import type { AttachedDevice, DeviceAttacher, DeviceLister } from "../backend";
import { RemovalLedger } from "../removal-ledger";
import { sentRequestSignal } from "../sent-request";
import { QmpClient, QmpError, type QmpEvent } from "./qmp";

export interface QemuBackendOptions {
  /** How often Detach re-reads the VM while it waits for the guest (default 500 ms). */
  readonly pollIntervalMs?: number;
  /** vfiod's bound on each QMP command, whatever the caller's deadline (--hypervisor-timeout). */
  readonly requestTimeoutMs?: number;
  /** Told of every QMP command once it ends (metrics). */
  readonly observe?: HypervisorCallObserver;
}

const PERIPHERAL = "/machine/peripheral";
const VFIO_CHILD = "child<vfio-pci>";
const ROOT_PORT_CHILD = "child<pcie-root-port>";

/** device_add refusals with their own reason; QEMU's desc fragments per qemu-qmp.md §3. */
const DEVICE_ADD_REFUSALS: readonly (readonly [string, Reason])[] = [
  ["Duplicate device ID", "ID_IN_USE"],
  ["already attached", "DEVICE_ALREADY_ATTACHED"],
  ["is not viable", "IOMMU_GROUP_NOT_VIABLE"],
  ["no such host device", "DEVICE_NOT_FOUND"],
  // The kernel refused to open the device's VFIO group: another process holds it (EBUSY, qemu-qmp.md §3).
  ["Device or resource busy", "DEVICE_IN_USE"],
];

/**
 * device_del refusals that mean a removal is already under way (qemu-qmp.md §4, native
 * PCIe hot-plug): a repeat within 5 s of the request (qdev-monitor.c), and a later one
 * while the guest blinks the slot's power indicator on its way to releasing it (hw/pci/pcie.c).
 */
const UNPLUG_UNDER_WAY: readonly string[] = [
  "already in the process of unplug",
  "guest is busy (power indicator blinking)",
];

interface QomProperty {
  readonly name: string;
  readonly type: string;
}

interface PciDeviceInfo {
  readonly bus: number;
  readonly slot: number;
  readonly function: number;
  readonly qdev_id: string;
  readonly pci_bridge?: { readonly bus: { readonly secondary: number }; readonly devices?: readonly PciDeviceInfo[] };
}

export class QemuBackend implements DeviceLister, DeviceAttacher {
  private readonly pollIntervalMs: number;
  private readonly requestTimeoutMs: number;
  private readonly observe: HypervisorCallObserver;
  /** One QMP session per socket at a time, in arrival order: QEMU serves one client (qemu-qmp.md §1). */
  private readonly sessions = new KeyedLocks();
  private readonly listReads = new FreshReads<AttachedDevice[]>();
  /**
   * Removals QEMU accepted, per socket. A repeated device_del is not harmless
   * (§4), so a later Detach only waits; the id stays in /machine/peripheral
   * until the guest acknowledges, so Attach must not take it for the device.
   */
  private readonly removals = new RemovalLedger();

  constructor(options: QemuBackendOptions = {}) {
    this.pollIntervalMs = options.pollIntervalMs ?? 500;
    this.requestTimeoutMs = options.requestTimeoutMs ?? DEFAULT_HYPERVISOR_TIMEOUT_MS;
    this.observe = options.observe ?? unobserved;
  }

  async attach(vm: VmRecord, device: PciAddress, id: string, signal: AbortSignal): Promise<AttachedDevice> {
    return this.session(vm, signal, async (monitor) => {
      await monitor.requireRunning();
      const peripherals = await monitor.peripherals();
      const attached = await monitor.vfioDevices(peripherals);
      const meta = { vm: vm.id, device: device.bdf };
      const removing = (held: AttachedDevice) => this.removals.pending(vm.socket, held.id) === held.bdf;
      if (id !== "" && peripherals.some((p) => p.name === id)) {
        const same = attached.find((d) => d.id === id && d.bdf === device.bdf);
        if (same !== undefined && !removing(same)) return same;
        const why = same !== undefined ? "still held: its removal is pending in the guest; retry once the guest has released it" : "already used by another device";
        throw new VfiodError("ID_IN_USE", `${monitor.label}: id ${JSON.stringify(id)} is ${why}`, { meta: { ...meta, id } });
      }
      const holder = attached.find((d) => d.bdf === device.bdf);
      if (holder !== undefined) {
        const pending = removing(holder) ? " (its removal is pending in the guest)" : "";
        throw new VfiodError(
          "DEVICE_ALREADY_ATTACHED",
          `${monitor.label}: ${device.bdf} is already attached as ${JSON.stringify(holder.id)}${pending}`,
          { meta: { ...meta, id: holder.id } },
        );
      }
      const port = await monitor.freeRootPort(peripherals);
      const newId = id !== "" ? id : freeId(peripherals);
      await monitor.deviceAdd(device, newId, port);
      this.removals.reused(vm.socket, newId);
      // The device is in: a failed or cut-short read of its guest address must not turn that into an error.
      const guestBdf = await monitor.guestAddresses().then(
        (addresses) => addresses.get(newId) ?? "",
        () => "",
      );
      return { id: newId, bdf: device.bdf, path: device.path, guestBdf };
    });
  }

  async detach(
    vm: VmRecord,
    id: string,
    waitMs: number,
    signal: AbortSignal,
    requested?: (device: AttachedDevice) => void,
  ): Promise<AttachedDevice> {
    return this.session(vm, signal, async (monitor) => {
      await monitor.requireRunning();
      const entry = (await monitor.peripherals()).find((p) => p.name === id);
      const removed = (bdf: string): AttachedDevice => ({ id, bdf, ...(bdf === "" ? { path: "" } : addressOfBdf(bdf)), guestBdf: "" });
      if (entry === undefined) {
        // The removal vfiod requested has finished (now or earlier): a retried Detach succeeds.
        this.removals.completed(vm.socket, id);
        const bdf = this.removals.removed(vm.socket, id);
        if (bdf !== undefined) return removed(bdf);
      }
      // Only vfio-pci: vfiod must never remove a VM's NIC or disk.
      if (entry?.type !== VFIO_CHILD) {
        const what = entry === undefined ? "no device" : `a ${entry.type.slice(6, -1)}, not a vfio-pci device`;
        throw new VfiodError("DEVICE_NOT_ATTACHED", `${monitor.label}: id ${JSON.stringify(id)} is ${what}`, {
          meta: { vm: vm.id, id },
        });
      }
      const bdf = (await monitor.hostAddress(id)).bdf;
      // Subscribe first: QEMU can announce DEVICE_DELETED before device_del's reply (§4).
      const stop = new AbortController();
      const deleted = monitor.deviceDeleted(id, AbortSignal.any([signal, stop.signal]));
      deleted.catch(() => undefined); // observed through the race in awaitRemoval
      try {
        // The same device with a removal pending: only wait again. Another device
        // under this id means that removal finished and the id was reused.
        if (this.removals.pending(vm.socket, id) !== bdf) {
          if ((await monitor.deviceDel(id)) === "gone") return removed(bdf);
          this.removals.requested(vm.socket, id, bdf);
        }
        requested?.(removed(bdf));
        await this.awaitRemoval(monitor, id, bdf, deleted, waitMs, signal);
        this.removals.completed(vm.socket, id);
        return removed(bdf);
      } finally {
        stop.abort();
      }
    });
  }

  /** query-status: running, paused, prelaunch, shutdown, ... */
  state(vm: VmRecord, signal: AbortSignal): Promise<string> {
    return this.session(vm, signal, (monitor) => monitor.status());
  }

  /** Every vfio-pci device, pending removals included; concurrent callers share one session. */
  list(vm: VmRecord, signal: AbortSignal): Promise<AttachedDevice[]> {
    const what = `qemu VM ${JSON.stringify(vm.name)}: list`;
    return this.listReads.read(vm.socket, signal, what, () =>
      withinBound(undefined, this.requestTimeoutMs, what, (bounded) =>
        this.session(vm, bounded, async (monitor) => {
          const peripherals = await monitor.peripherals();
          for (const [id] of this.removals.pendingOf(vm.socket)) {
            if (!peripherals.some((p) => p.name === id)) this.removals.completed(vm.socket, id);
          }
          return monitor.vfioDevices(peripherals);
        }),
      ),
    );
  }

  /** Waits for the event or a fresh read showing the id gone; events sent while nobody was connected are lost (§1). */
  private async awaitRemoval(
    monitor: Monitor,
    id: string,
    bdf: string,
    deleted: Promise<unknown>,
    waitMs: number,
    signal: AbortSignal,
  ): Promise<void> {
    const budget = AbortSignal.any([signal, AbortSignal.timeout(waitMs)]);
    const started = Date.now();
    try {
      for (;;) {
        if (!(await monitor.hasPeripheral(id, budget))) return;
        const tick = new AbortController();
        const poll = sleep(this.pollIntervalMs, false, { signal: AbortSignal.any([budget, tick.signal]) });
        try {
          if (await Promise.race([deleted.then(() => true), poll])) return;
        } finally {
          tick.abort();
        }
      }
    } catch (err) {
      const cancelled = signal.aborted && !isTimeout(signal.reason);
      if (cancelled) throw abortedError(signal, `${monitor.label}: waiting for the guest to release ${id}`);
      if (!budget.aborted) throw err;
      throw new VfiodError(
        "DETACH_PENDING",
        `${monitor.label}: removal of ${JSON.stringify(id)} requested; the guest has not released it after ` +
          `${((Date.now() - started) / 1000).toFixed(1)} s. It stays attached until the guest acknowledges; Detach again or List to check`,
        { meta: { vm: monitor.vmId, id, ...(bdf === "" ? {} : { device: bdf }) }, cause: err },
      );
    }
  }

  /** Runs `op` with a fresh QMP session, after the operations queued before it on the same socket. */
  private session<T>(vm: VmRecord, signal: AbortSignal, op: (monitor: Monitor) => Promise<T>): Promise<T> {
    const label = `qemu VM ${JSON.stringify(vm.name)}`;
    const gaveUp = () => abortedError(signal, `${label}: waiting for another operation on this VM`);
    return this.sessions.run(vm.socket, signal, gaveUp, async () => {
      const client = await withinBound(signal, this.requestTimeoutMs, `${label}: QMP connect`, (bounded) =>
        QmpClient.connect(vm.socket, { label, signal: bounded }),
      );
      try {
        return await op(new Monitor(client, vm.id, signal, this.requestTimeoutMs, this.observe));
      } finally {
        client.close();
      }
    });
  }

  /** Sockets with operations queued behind the one in progress: [socket, waiting]. */
  queues(): [string, number][] {
    return this.sessions.queues();
  }
}

/** The QMP reads and writes of one operation, bound to its signal. */
class Monitor {
  readonly label: string;

  constructor(
    private readonly client: QmpClient,
    readonly vmId: string,
    private readonly signal: AbortSignal,
    private readonly requestTimeoutMs: number,
    private readonly observe: HypervisorCallObserver,
  ) {
    this.label = client.label;
  }

  async status(): Promise<string> {
    return String(((await this.run("query-status")) as { status: unknown }).status);
  }

  /** @throws VM_PAUSED, VM_NOT_RUNNING (prelaunch, shutdown, ...) */
  async requireRunning(): Promise<void> {
    const status = await this.status();
    if (status === "running") return;
    const meta = { vm: this.vmId, status };
    if (status === "paused") throw new VfiodError("VM_PAUSED", `${this.label} is paused; resume it first`, { meta });
    throw new VfiodError("VM_NOT_RUNNING", `${this.label} is not running (QEMU status ${JSON.stringify(status)})`, { meta });
  }

  /** Every device with an id, of any type (§5). */
  async peripherals(): Promise<QomProperty[]> {
    return (await this.qomList(PERIPHERAL)).filter((p) => p.type.startsWith("child<"));
  }

  async hasPeripheral(id: string, signal: AbortSignal): Promise<boolean> {
    const props = (await this.execute("qom-list", { path: PERIPHERAL }, signal)) as QomProperty[];
    return props.some((p) => p.name === id);
  }

  async vfioDevices(peripherals: readonly QomProperty[]): Promise<AttachedDevice[]> {
    const ids = peripherals.filter((p) => p.type === VFIO_CHILD).map((p) => p.name);
    if (ids.length === 0) return [];
    const guest = await this.guestAddresses();
    const devices: AttachedDevice[] = [];
    for (const id of ids.sort()) devices.push({ id, ...(await this.hostAddress(id)), guestBdf: guest.get(id) ?? "" });
    return devices;
  }

  /** The host device of a vfio-pci; `sysfsdev` is filled at realize even when added with `host` (§5). */
  async hostAddress(id: string): Promise<PciAddress> {
    const get = async (property: string): Promise<string> =>
      String(await this.run("qom-get", { path: `${PERIPHERAL}/${id}`, property }));
    const sysfsdev = await get("sysfsdev");
    const name = sysfsdev !== "" ? sysfsdev.slice(sysfsdev.lastIndexOf("/") + 1) : await get("host");
    return isCanonicalBdf(name) ? addressOfBdf(name) : { bdf: "", path: "" };
  }

  /** The first pcie-root-port, in name order, with nothing plugged into its bus (§5). */
  async freeRootPort(peripherals: readonly QomProperty[]): Promise<string> {
    const ports = peripherals
      .filter((p) => p.type === ROOT_PORT_CHILD)
      .map((p) => p.name)
      .sort((a, b) => a.localeCompare(b, "en", { numeric: true }));
    for (const port of ports) {
      // The bus of a root port is named after the port's id.
      const occupants = (await this.qomList(`${PERIPHERAL}/${port}/${port}`)).filter((p) => p.name.startsWith("child["));
      if (occupants.length === 0) return port;
    }
    throw new VfiodError(
      "NO_FREE_SLOT",
      `${this.label}: no free pcie-root-port (${ports.length} with an id, all occupied); root ports cannot be ` +
        "hot-plugged, so boot the VM with spare ones: -device pcie-root-port,id=rpN,bus=pcie.0,chassis=N,slot=N",
      { meta: { vm: this.vmId, rootPorts: String(ports.length) } },
    );
  }

  /** Sends device_add once: it is not idempotent. */
  async deviceAdd(device: PciAddress, id: string, port: string): Promise<void> {
    // sysfsdev, not host: host= refuses 5-digit (VMD) domains (§3).
    const args = { driver: "vfio-pci", id, bus: port, sysfsdev: device.path };
    try {
      await this.execute("device_add", args, sentRequestSignal(this.signal, `${this.label}: device_add`));
    } catch (err) {
      const meta = { vm: this.vmId, device: device.bdf, id };
      if (err instanceof QmpError) {
        const reason = DEVICE_ADD_REFUSALS.find(([fragment]) => err.desc.includes(fragment))?.[1] ?? "HYPERVISOR_ERROR";
        throw new VfiodError(reason, `${this.label}: device_add ${device.bdf}: ${err.desc}`, {
          meta: { ...meta, qmpClass: err.qmpClass },
          cause: err,
        });
      }
      if (err instanceof VfiodError && err.reason === "HYPERVISOR_UNAVAILABLE") {
        throw new VfiodError(err.reason, `${err.message}; the device may have been added: List to check`, {
          code: err.code,
          meta,
          cause: err,
        });
      }
      throw err;
    }
  }

  /** "gone" when QEMU no longer knows the id (a pending removal finished meanwhile). */
  async deviceDel(id: string): Promise<"requested" | "gone"> {
    try {
      await this.execute("device_del", { id }, sentRequestSignal(this.signal, `${this.label}: device_del`));
      return "requested";
    } catch (err) {
      if (!(err instanceof QmpError)) throw err;
      if (UNPLUG_UNDER_WAY.some((fragment) => err.desc.includes(fragment))) return "requested";
      if (err.qmpClass === "DeviceNotFound") return "gone";
      throw new VfiodError("HYPERVISOR_ERROR", err.message, { meta: { vm: this.vmId, id, qmpClass: err.qmpClass }, cause: err });
    }
  }

  deviceDeleted(id: string, signal: AbortSignal): Promise<QmpEvent> {
    // Match data.device: virtio devices also send one carrying only a path (§4).
    const match = (e: QmpEvent): boolean => e.event === "DEVICE_DELETED" && e.data?.device === id;
    return this.client.waitEvent(match, signal, `waiting for DEVICE_DELETED of ${id}`);
  }

  /**
   * qdev id -> guest BDF. Devices behind a bridge get a bus number only once the
   * firmware has numbered it; before that (prelaunch) the secondary bus is 0 (§5).
   */
  async guestAddresses(): Promise<Map<string, string>> {
    const buses = (await this.run("query-pci")) as { devices: PciDeviceInfo[] }[];
    const found = new Map<string, string>();
    const walk = (devices: readonly PciDeviceInfo[]): void => {
      for (const d of devices) {
        if (d.qdev_id !== "") found.set(d.qdev_id, guestBdf(d));
        const bridge = d.pci_bridge;
        if (bridge?.devices !== undefined && bridge.bus.secondary !== 0) walk(bridge.devices);
      }
    };
    for (const bus of buses) walk(bus.devices);
    return found;
  }

  private async qomList(path: string): Promise<QomProperty[]> {
    return (await this.run("qom-list", { path })) as QomProperty[];
  }

  private run(command: string, args?: Record<string, unknown>): Promise<unknown> {
    return withinBound(this.signal, this.requestTimeoutMs, `${this.label}: ${command}`, (bounded) =>
      this.execute(command, args, bounded),
    );
  }

  /** One command, timed for the metrics; an error reply counts as answered. */
  private execute(command: string, args: Record<string, unknown> | undefined, signal: AbortSignal): Promise<unknown> {
    return observed(
      this.observe,
      "qemu",
      command,
      () => this.client.execute(command, args, signal),
      (err) => err instanceof QmpError,
    );
  }
}

function guestBdf(d: PciDeviceInfo): string {
  const hex2 = (n: number): string => n.toString(16).padStart(2, "0");
  return `0000:${hex2(d.bus)}:${hex2(d.slot)}.${d.function}`;
}

/** hostdevN, libvirt's naming, with the lowest N no device of the VM uses. */
function freeId(peripherals: readonly QomProperty[]): string {
  const used = new Set(peripherals.map((p) => p.name));
  let n = 0;
  while (used.has(`hostdev${n}`)) n++;
  return `hostdev${n}`;
}

function isTimeout(reason: unknown): boolean {
  return reason instanceof DOMException && reason.name === "TimeoutError";
}
