// Cloud Hypervisor hot-plug, after cocoon's CH backend (../shared/reference/cocoon.md
// A.2): read vm.info, check state and conflicts, then send one request. CH itself is
// the record of what is attached; this file stores nothing.
import { setTimeout as sleep } from "node:timers/promises";
import { abortedError, Code, VfiodError } from "../../errors";
import type { VmRecord } from "../../inventory/vm";
import { parsePciAddress, type PciAddress } from "../../pci/address";
import type { AttachedDevice, Backend } from "../backend";
import { PendingRemovals } from "../pending-removals";
import { sentRequestSignal } from "../sent-request";
import { CloudHypervisorClient, type ChDeviceConfig, type ChVmInfo } from "./client";

export interface CloudHypervisorBackendOptions {
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

function devicesOf(info: ChVmInfo): readonly ChDeviceConfig[] {
  return info.config.devices ?? [];
}

function hasNode(info: ChVmInfo, id: string): boolean {
  return Object.hasOwn(info.device_tree ?? {}, id);
}

/** Whether a config section other than `devices` (disks, net, fs, vsock, ...) uses `id`. */
function otherDeviceHolds(info: ChVmInfo, id: string): boolean {
  const holds = (entry: unknown) =>
    typeof entry === "object" && entry !== null && (entry as { id?: unknown }).id === id;
  return Object.entries(info.config).some(
    ([section, value]) => section !== "devices" && (Array.isArray(value) ? value.some(holds) : holds(value)),
  );
}

function toAttached(entry: ChDeviceConfig, info: ChVmInfo): AttachedDevice {
  const id = entry.id ?? "";
  const address = addressOf(entry.path);
  return {
    id,
    bdf: address?.bdf ?? "",
    path: address?.path ?? entry.path ?? "",
    guestBdf: info.device_tree?.[id]?.pci_bdf ?? "",
  };
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

export class CloudHypervisorBackend implements Backend {
  private readonly pollIntervalMs: number;
  /**
   * Removals this vfiod requested that the guest has not finished, per API
   * socket: id -> host BDF. CH drops the device from config.devices at once but
   * keeps its node, and its VFIO group open, until the guest ejects; its node
   * carries no host address, so vfiod remembers it to keep reporting the device
   * as held (List, and the one-device-one-VM check).
   */
  private readonly pendingRemovals = new PendingRemovals();

  constructor(options: CloudHypervisorBackendOptions = {}) {
    this.pollIntervalMs = options.pollIntervalMs ?? 100;
  }

  /**
   * Sends vm.add-device at most once. A retry with the same id and device
   * returns the attached device and sends nothing.
   * @throws VM_NOT_RUNNING, VM_PAUSED, ID_IN_USE, DEVICE_ALREADY_ATTACHED,
   *   NO_FREE_SLOT, HYPERVISOR_ERROR, HYPERVISOR_UNAVAILABLE
   */
  async attach(vm: VmRecord, device: PciAddress, id: string, signal: AbortSignal): Promise<AttachedDevice> {
    const client = new CloudHypervisorClient(vm.socket, vm.name);
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
    const stillHeld = [...this.pendingRemovals.of(vm.socket)].find(([pendingId, bdf]) => bdf === device.bdf && hasNode(info, pendingId));
    if (stillHeld !== undefined) {
      const message =
        `vm ${vm.name}: device ${device.bdf} is still held under id ${stillHeld[0]}: its removal is pending in the guest; ` +
        "retry once the guest has released it";
      throw new VfiodError("DEVICE_ALREADY_ATTACHED", message, { meta: { ...meta, id: stillHeld[0] } });
    }
    const sent = sentRequestSignal(signal, `cloud-hypervisor vm ${vm.name}: vm.add-device`);
    const added = await client.addDevice(id === "" ? { path: device.path } : { path: device.path, id }, sent).catch(
      (err: unknown) => {
        // Sent but no complete reply (a lost ACK): CH may well have added it (as the QEMU backend says).
        if (!(err instanceof VfiodError) || err.reason !== "HYPERVISOR_UNAVAILABLE") throw err;
        throw new VfiodError(err.reason, `${err.message}; the device may have been added: List to check`, {
          code: err.code,
          meta,
          cause: err,
        });
      },
    );
    if (added === undefined && id === "") {
      const message = `vm ${vm.name}: cloud-hypervisor added the device to its config only and named no id`;
      throw new VfiodError("HYPERVISOR_ERROR", message, { code: Code.INTERNAL, meta });
    }
    return { id: added?.id ?? id, bdf: device.bdf, path: device.path, guestBdf: added?.bdf ?? "" };
  }

  /**
   * Requests removal unless one is already pending, then polls vm.info until the
   * guest has released the device, within `waitMs` and the signal.
   * @throws DEVICE_NOT_ATTACHED, DETACH_PENDING, VM_NOT_RUNNING, VM_PAUSED,
   *   HYPERVISOR_ERROR, HYPERVISOR_UNAVAILABLE
   */
  async detach(vm: VmRecord, id: string, waitMs: number, signal: AbortSignal): Promise<void> {
    const client = new CloudHypervisorClient(vm.socket, vm.name);
    const info = await client.vmInfo(signal);
    requireRunning(vm, info);
    const configured = devicesOf(info).find((d) => d.id === id);
    if (configured === undefined && (!hasNode(info, id) || otherDeviceHolds(info, id))) {
      const meta = { vm: vm.id, id };
      throw new VfiodError("DEVICE_NOT_ATTACHED", `vm ${vm.name}: device id "${id}" not attached`, { meta });
    }
    const pending = this.pendingRemovals.of(vm.socket);
    // A second remove is refused by v53.0 (PR #8559), so never repeat a pending one.
    if (configured !== undefined) {
      await client.removeDevice(id, sentRequestSignal(signal, `cloud-hypervisor vm ${vm.name}: vm.remove-device`));
      pending.set(id, addressOf(configured.path)?.bdf ?? "");
    }
    await this.awaitEject(client, vm, id, waitMs, signal);
    pending.delete(id);
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
      info = await new CloudHypervisorClient(vm.socket, vm.name).vmInfo(signal);
    } catch (err) {
      if (err instanceof VfiodError && err.reason === "VM_NOT_RUNNING") return [];
      throw err;
    }
    const configured = devicesOf(info).map((entry) => toAttached(entry, info));
    const pending = this.pendingRemovals.of(vm.socket);
    const held: AttachedDevice[] = [];
    for (const [id, bdf] of pending) {
      if (!hasNode(info, id) || configured.some((d) => d.id === id)) {
        pending.delete(id);
        continue;
      }
      const address = bdf === "" ? undefined : addressOf(bdf);
      held.push({ id, bdf, path: address?.path ?? "", guestBdf: info.device_tree?.[id]?.pci_bdf ?? "" });
    }
    return [...configured, ...held];
  }


  private async awaitEject(
    client: CloudHypervisorClient,
    vm: VmRecord,
    id: string,
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
          meta: { vm: vm.id, id },
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
        if (signal.aborted) throw pending(err);
        throw err;
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
