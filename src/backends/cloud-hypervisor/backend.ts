// Cloud Hypervisor hot-plug, after cocoon's CH backend (../shared/reference/cocoon.md
// A.2): read vm.info, check state and conflicts, then send one request. CH itself is
// the record of what is attached; this file keeps only the removals it requested.
import { setTimeout as sleep } from "node:timers/promises";
import { abortedError, Code, VfiodError } from "../../errors";
import type { VmRecord } from "../../inventory/vm";
import { parsePciAddress, type PciAddress } from "../../pci/address";
import { DEFAULT_HYPERVISOR_TIMEOUT_MS } from "../../request-bound";
import type { AttachedDevice, DeviceAttacher, DeviceLister } from "../backend";
import { RemovalLedger } from "../removal-ledger";
import {
  CloudHypervisorSockets,
  type CloudHypervisorClient,
  type ChDeviceConfig,
  type ChDeviceNode,
  type ChVmInfo,
} from "./client";

export interface CloudHypervisorBackendOptions {
  /** The owner of vfiod's connections to CH sockets (default: its own, with the default bound). */
  sockets?: CloudHypervisorSockets;
  /** How often detach re-reads vm.info while the guest ejects (cocoon: 100 ms). */
  pollIntervalMs?: number;
}

/** The host address in a config path, compared by BDF because CH compares raw strings. */
function addressOf(devicePath: string | null | undefined): PciAddress | undefined {
  if (typeof devicePath !== "string") return undefined;
  try {
    return parsePciAddress(devicePath);
  } catch {
    return undefined;
  }
}

/** Bound on undoing a config-only add: a mutation of vfiod's own, sent whatever the caller does. */
const SENT_UNDO_MS = 30_000;

function devicesOf(info: ChVmInfo): readonly ChDeviceConfig[] {
  return info.config.devices ?? [];
}

/** The device_tree node of `id` (an own key: ids come from callers, "toString" included). */
function nodeOf(info: ChVmInfo, id: string): ChDeviceNode | undefined {
  const tree = info.device_tree ?? {};
  return Object.hasOwn(tree, id) ? tree[id] : undefined;
}

function hasNode(info: ChVmInfo, id: string): boolean {
  return nodeOf(info, id) !== undefined;
}

/** Whether a config section other than `devices` (disks, net, fs, vsock, ...) uses `id`. */
function otherDeviceHolds(info: ChVmInfo, id: string): boolean {
  const holds = (entry: unknown) =>
    typeof entry === "object" && entry !== null && (entry as { id?: unknown }).id === id;
  return Object.entries(info.config).some(
    ([section, value]) => section !== "devices" && (Array.isArray(value) ? value.some(holds) : holds(value)),
  );
}

/**
 * A device_tree node that can only be a VFIO device whose removal is pending: in
 * no config section, one node with no parent and no children (virtio devices are
 * two nodes, `_virtio-pci-<id>` and its child), not a built-in (`__` prefix).
 * cloud-hypervisor.md §2.
 */
function isPendingVfioNode(info: ChVmInfo, id: string): boolean {
  const node = nodeOf(info, id);
  if (node === undefined || id.startsWith("__") || otherDeviceHolds(info, id)) return false;
  return (node.parent ?? undefined) === undefined && (node.children ?? []).length === 0;
}

function toAttached(entry: ChDeviceConfig, info: ChVmInfo): AttachedDevice {
  const id = entry.id ?? "";
  const address = addressOf(entry.path);
  return {
    id,
    bdf: address?.bdf ?? "",
    path: address?.path ?? entry.path ?? "",
    guestBdf: nodeOf(info, id)?.pci_bdf ?? "",
  };
}

function heldDevice(id: string, bdf: string, info: ChVmInfo): AttachedDevice {
  const address = bdf === "" ? undefined : addressOf(bdf);
  return { id, bdf, path: address?.path ?? "", guestBdf: nodeOf(info, id)?.pci_bdf ?? "" };
}

/** Only a running VM takes hot-plug; cocoon refuses a paused one (cloud-hypervisor.md §4). */
function requireRunning(vm: VmRecord, info: ChVmInfo): void {
  if (info.state === "Running") return;
  const meta = { vm: vm.id, state: info.state };
  if (info.state === "Paused") {
    // cocoon's text (cocoon.md A.2).
    throw new VfiodError(
      "VM_PAUSED",
      `vm ${vm.name} is paused (snapshot or hibernate in flight); retry after it completes`,
      { meta },
    );
  }
  throw new VfiodError("VM_NOT_RUNNING", `vm ${vm.name} is not running (cloud-hypervisor state ${info.state})`, {
    meta,
  });
}

export class CloudHypervisorBackend implements DeviceLister, DeviceAttacher {
  private readonly sockets: CloudHypervisorSockets;
  private readonly pollIntervalMs: number;
  /**
   * Removals this vfiod requested, per API socket. CH drops the device from
   * config.devices at once but keeps its node, and its VFIO group open, until the
   * guest ejects; its node carries no host address, so vfiod remembers it to keep
   * reporting the device as held (List, and the one-device-one-VM check).
   */
  private readonly removals = new RemovalLedger();

  constructor(options: CloudHypervisorBackendOptions = {}) {
    this.sockets = options.sockets ?? new CloudHypervisorSockets(DEFAULT_HYPERVISOR_TIMEOUT_MS);
    this.pollIntervalMs = options.pollIntervalMs ?? 100;
  }

  private client(vm: VmRecord): CloudHypervisorClient {
    return this.sockets.client(vm.socket, vm.name);
  }

  /**
   * Sends vm.add-device at most once. A retry with the same id and device
   * returns the attached device and sends nothing.
   * @throws VM_NOT_RUNNING, VM_PAUSED, ID_IN_USE, DEVICE_ALREADY_ATTACHED,
   *   NO_FREE_SLOT, HYPERVISOR_ERROR, HYPERVISOR_UNAVAILABLE
   */
  async attach(vm: VmRecord, device: PciAddress, id: string, signal: AbortSignal): Promise<AttachedDevice> {
    const client = this.client(vm);
    const meta = { vm: vm.id, device: device.bdf, ...(id === "" ? {} : { id }) };
    const info = await client.vmInfo(signal);
    requireRunning(vm, info);
    const devices = devicesOf(info);
    const sameId = id === "" ? undefined : devices.find((d) => d.id === id);
    if (sameId !== undefined) {
      if (addressOf(sameId.path)?.bdf === device.bdf) return toAttached(sameId, info);
      const holder = sameId.path ?? "another device";
      throw new VfiodError("ID_IN_USE", `vm ${vm.name}: device id "${id}" already in use by ${holder}`, { meta });
    }
    const sameDevice = devices.find((d) => addressOf(d.path)?.bdf === device.bdf);
    if (sameDevice !== undefined) {
      // cocoon's wording (cocoon.md A.2).
      const message = `vm ${vm.name}: device ${device.bdf} already attached (id=${sameDevice.id ?? ""})`;
      throw new VfiodError("DEVICE_ALREADY_ATTACHED", message, { meta });
    }
    if (id !== "" && otherDeviceHolds(info, id)) {
      throw new VfiodError("ID_IN_USE", `vm ${vm.name}: device id "${id}" already in use by another device`, { meta });
    }
    if (id !== "" && hasNode(info, id)) {
      // CH #4038: the old node keeps the id until the guest ejects it.
      const message =
        `vm ${vm.name}: device id "${id}" is still held: its removal is pending in the guest; ` +
        "retry later or use another id";
      throw new VfiodError("ID_IN_USE", message, { meta });
    }
    const stillHeld = this.removals
      .pendingOf(vm.socket)
      .find(([pendingId, bdf]) => bdf === device.bdf && hasNode(info, pendingId));
    if (stillHeld !== undefined) {
      const message =
        `vm ${vm.name}: device ${device.bdf} is still held under id ${stillHeld[0]}: its removal is pending in the guest; ` +
        "retry once the guest has released it";
      throw new VfiodError("DEVICE_ALREADY_ATTACHED", message, { meta: { ...meta, id: stillHeld[0] } });
    }
    const added = await client.addDevice(id === "" ? { path: device.path } : { path: device.path, id }, signal).catch(
      (err: unknown) => {
        // Sent but no complete reply (a lost ACK): CH may well have added it (as the QEMU backend says).
        if (!(err instanceof VfiodError) || err.reason !== "HYPERVISOR_UNAVAILABLE" || signal.aborted) throw err;
        throw new VfiodError(err.reason, `${err.message}; the device may have been added: List to check`, {
          code: err.code,
          meta,
          cause: err,
        });
      },
    );
    if (added === undefined) return this.undoConfigOnlyAdd(vm, client, device, id, meta);
    this.removals.reused(vm.socket, added.id);
    return { id: added.id, bdf: device.bdf, path: device.path, guestBdf: added.bdf };
  }

  /**
   * A 204 to add-device means the VM is not booted (it left Running after vfiod's
   * read): CH only changed the config, and would plug the device at the next
   * boot, which runtime-only attach never does. Take the entry out again.
   * @throws VM_NOT_RUNNING, or HYPERVISOR_ERROR when the entry cannot be taken out.
   */
  private async undoConfigOnlyAdd(
    vm: VmRecord,
    client: CloudHypervisorClient,
    device: PciAddress,
    id: string,
    meta: Record<string, string>,
  ): Promise<never> {
    const notRunning = `vm ${vm.name} is no longer running: cloud-hypervisor took the device into its config only`;
    let entry: string | null | undefined = id;
    try {
      // Without an id, find the entry by its device (a 204 has no body).
      if (id === "") {
        const devices = devicesOf(await client.vmInfo(AbortSignal.timeout(SENT_UNDO_MS)));
        entry = devices.find((d) => addressOf(d.path)?.bdf === device.bdf)?.id;
      }
      // CH names a device only when the VM boots: an entry without an id cannot be removed through the API.
      if (entry === undefined || entry === null) throw new Error("its config entry has no id yet, and remove-device needs one");
      await client.removeDevice(entry, AbortSignal.timeout(SENT_UNDO_MS));
    } catch (cause) {
      const how = entry ? `ch-remote remove-device ${entry}` : "take it out of the VM's configuration";
      throw new VfiodError(
        "HYPERVISOR_ERROR",
        `${notRunning}, and vfiod could not take it out again (${(cause as Error).message}); it would be attached ` +
          `at the next boot: ${how}`,
        { code: Code.INTERNAL, meta, cause },
      );
    }
    throw new VfiodError("VM_NOT_RUNNING", `${notRunning}; taken out again, nothing changed`, { meta });
  }

  /**
   * Requests removal unless vfiod already did, then polls vm.info until the guest
   * has released the device, within `waitMs` and the signal.
   * @throws DEVICE_NOT_ATTACHED, DETACH_PENDING, VM_NOT_RUNNING, VM_PAUSED,
   *   HYPERVISOR_ERROR, HYPERVISOR_UNAVAILABLE
   */
  async detach(
    vm: VmRecord,
    id: string,
    waitMs: number,
    signal: AbortSignal,
    requested?: (device: AttachedDevice) => void,
  ): Promise<AttachedDevice> {
    const client = this.client(vm);
    const info = await client.vmInfo(signal);
    requireRunning(vm, info);
    const configured = devicesOf(info).find((d) => d.id === id);
    const pending = this.removals.pending(vm.socket, id);
    const removed = this.removals.removed(vm.socket, id);
    let bdf: string;
    if (configured !== undefined) {
      bdf = addressOf(configured.path)?.bdf ?? "";
      await client.removeDevice(id, signal);
      this.removals.requested(vm.socket, id, bdf);
    } else if (pending !== undefined) {
      // A second remove is refused by v53.0 (PR #8559): never repeat one, only wait.
      bdf = pending;
    } else if (removed !== undefined && !hasNode(info, id)) {
      // The removal vfiod requested has completed: a retried Detach succeeds.
      return heldDevice(id, removed, info);
    } else if (isPendingVfioNode(info, id)) {
      // Requested before vfiod (re)started, or by someone else: wait for it too.
      bdf = "";
    } else {
      throw new VfiodError("DEVICE_NOT_ATTACHED", `vm ${vm.name}: device id "${id}" not attached`, {
        meta: { vm: vm.id, id },
      });
    }
    requested?.(heldDevice(id, bdf, info));
    await this.awaitEject(client, vm, id, bdf, waitMs, signal);
    this.removals.completed(vm.socket, id);
    return heldDevice(id, bdf, info);
  }

  queues(): [string, number][] {
    return this.sockets.queues();
  }

  /** vm.info's state: Created, Running, Paused, Shutdown, BreakPoint (cloud-hypervisor.md §2). */
  async state(vm: VmRecord, signal: AbortSignal): Promise<string> {
    return (await this.client(vm).vmInfo(signal)).state;
  }

  /**
   * The VFIO devices in config.devices, in CH's order, then those whose removal
   * vfiod requested and the guest has not finished (still held); [] when no VM
   * is created.
   * @throws HYPERVISOR_ERROR, HYPERVISOR_UNAVAILABLE
   */
  async list(vm: VmRecord, signal: AbortSignal): Promise<AttachedDevice[]> {
    let info: ChVmInfo;
    try {
      info = await this.client(vm).vmInfo(signal);
    } catch (err) {
      if (err instanceof VfiodError && err.reason === "VM_NOT_RUNNING") return [];
      throw err;
    }
    const configured = devicesOf(info).map((entry) => toAttached(entry, info));
    const held: AttachedDevice[] = [];
    for (const [id, bdf] of this.removals.pendingOf(vm.socket)) {
      if (!hasNode(info, id)) this.removals.completed(vm.socket, id);
      else if (!configured.some((d) => d.id === id)) held.push(heldDevice(id, bdf, info));
    }
    return [...configured, ...held];
  }

  private async awaitEject(
    client: CloudHypervisorClient,
    vm: VmRecord,
    id: string,
    bdf: string,
    waitMs: number,
    signal: AbortSignal,
  ): Promise<void> {
    const started = performance.now();
    const pending = (cause?: unknown) => {
      const waited = ((performance.now() - started) / 1000).toFixed(1);
      return new VfiodError(
        "DETACH_PENDING",
        `vm ${vm.name}: the guest has not released device ${id} within ${waited} s; ` +
          "its removal stays requested (a later Detach or List tells the truth)",
        {
          meta: { vm: vm.id, id, ...(bdf === "" ? {} : { device: bdf }) },
          cause,
          // Cut short by the caller: keep the caller's code (CANCELLED or DEADLINE_EXCEEDED).
          code: signal.aborted ? abortedError(signal, "").code : Code.DEADLINE_EXCEEDED,
        },
      );
    };
    for (;;) {
      let info: ChVmInfo;
      try {
        info = await client.vmInfo(signal);
      } catch (err) {
        // The removal was accepted: a failed read (a transient 503, a cut-short
        // wait) leaves it requested, which is what the caller must hear.
        throw pending(err);
      }
      if (!hasNode(info, id)) return;
      const remaining = waitMs - (performance.now() - started);
      if (remaining <= 0) throw pending();
      try {
        await sleep(Math.min(this.pollIntervalMs, remaining), undefined, { signal });
      } catch (err) {
        throw pending(err);
      }
    }
  }
}
