// A Cloud Hypervisor API double that speaks micro_http's exact bytes over a Unix
// socket and keeps the VMM's device bookkeeping, following
// ../shared/reference/cloud-hypervisor.md §1–§5; quoted error strings come from
// there unless a comment says otherwise. It serves only the endpoints vfiod calls
// (vmm.ping, vm.info, vm.add-device, vm.remove-device); CH would serve the others.
import fs from "node:fs";
import net from "node:net";
import path from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { listenOn } from "./listen";
import { VmmProcess } from "./vmm-process";

/** Which CH behaviour to imitate where versions differ (§3 status table, null vs absent). */
export type ChProfile = "v52" | "v53" | "main";
export type ChVmState = "Created" | "Running" | "Paused" | "Shutdown";

/** What the next request to an endpoint gets instead of a normal answer. */
export type ChFault =
  /** Answer this (CH's headers) and change nothing, e.g. a 500 or garbage JSON. */
  | { kind: "respond"; status: number; body: string }
  /** Act on the request, then drop the connection halfway through the reply (a lost ACK). */
  | { kind: "close-mid-response" }
  /** Never answer; like CH's single API thread, every later request waits too. */
  | { kind: "hang" }
  /** Act and answer after `ms` (a slow VFIO DMA map); later requests wait too. */
  | { kind: "delay"; ms: number }
  /** The VM moves to `state` just before this request is served (it left Running after a client's read). */
  | { kind: "state-first"; state: ChVmState };

/** One request as the double received it. */
export interface ChRequest {
  readonly method: string;
  /** Without the /api/v1 prefix when present: "vm.info". */
  readonly endpoint: string;
  /** Lower-case names. */
  readonly headers: Readonly<Record<string, string>>;
  /** Parsed JSON; the raw text when it does not parse; undefined without a body. */
  readonly body: unknown;
}

export interface ChDoubleOptions {
  profile?: ChProfile;
  /** The guest acks an unplug this long after remove-device; absent: only when a test calls guestEjects. */
  ejectAfterMs?: number;
  /**
   * Fake sysfs tree (test/support/fake-sysfs.ts) that add-device opens the way
   * vfio-ioctls would. The VM's stand-in process then really holds each attached
   * device's group node (<root>/dev/vfio/<group>) open, as CH does, until the guest
   * releases the device; a group another double's VM holds is refused with EBUSY.
   */
  sysfsRoot?: string;
  /** `--platform num_pci_segments`; default 1. */
  pciSegments?: number;
  /** Every request is answered this long after its turn comes (a busy VMM); later requests wait too. */
  replyDelayMs?: number;
}

interface Reply {
  status: number;
  body?: string;
}

interface VfioConfig {
  id?: string;
  path?: string;
  pciSegment: number;
  iommu: boolean;
}

interface DiskConfig {
  id?: string;
  path: string;
}

interface TreeNode {
  id: string;
  parent?: string;
  children: string[];
  segment?: number;
  slot?: number;
}

interface ParsedRequest {
  method: string;
  target: string;
  headers: Record<string, string>;
  body?: string;
}

/** The endpoints served and the one method each takes. */
export const CH_DOUBLE_ROUTES = {
  "vmm.ping": "GET",
  "vm.info": "GET",
  "vm.add-device": "PUT",
  "vm.remove-device": "PUT",
} as const;
export type ChEndpoint = keyof typeof CH_DOUBLE_ROUTES;

const API_ROOT = "/api/v1/";
const SLOTS_PER_SEGMENT = 32;
const VERSIONS: Record<ChProfile, { version: string; build_version: string }> = {
  v52: { version: "52.0.0", build_version: "v52.0" },
  v53: { version: "53.0.0", build_version: "v53.0" },
  main: { version: "54.0.0", build_version: "v53.0-246-gae44c2971" },
};
// micro_http server.rs SERVER_FULL_ERROR_MESSAGE, byte for byte (no space after 503).
const SERVER_FULL = Buffer.from(
  "HTTP/1.1 503\r\nServer: Firecracker API\r\nConnection: close\r\nContent-Length: 40\r\n\r\n" +
    '{ "error": "Too many open connections" }',
);
const MAX_CONNECTIONS = 10;
const VIABLE_DRIVER = /^(pci-stub|pcieport|vfio-pci|.*[_-]vfio[_-]pci)$/;

const ADD = "The device could not be added to the VM";
const REMOVE = "The device could not be removed from the VM";

function chain(status: number, ...messages: string[]): Reply {
  return { status, body: JSON.stringify(messages) };
}

/** CH's own response bytes: no reason phrase, and no Content-Type/Length on a 204. */
function encode(reply: Reply, server = "Cloud Hypervisor API", contentType = "application/json"): Buffer {
  const lines = [`HTTP/1.1 ${reply.status} `, `Server: ${server}`, "Connection: keep-alive"];
  const body = Buffer.from(reply.body ?? "");
  if (reply.status !== 204) lines.push(`Content-Type: ${contentType}`, `Content-Length: ${body.length}`);
  return Buffer.concat([Buffer.from(`${lines.join("\r\n")}\r\n\r\n`), body]);
}

// micro_http answers its own parse errors with a body that is not valid JSON (raw
// newline). cloud-hypervisor.md §1 says text/plain (unverified).
function parseErrorBytes(message: string): Buffer {
  const body = `{ "error": "${message}\nAll previous unanswered requests will be dropped." }`;
  return encode({ status: 400, body }, "Firecracker API", "text/plain");
}

/** serde's wording for a value of the wrong JSON type (line/column omitted). */
function jsonKind(value: unknown): string {
  if (value === null) return "null";
  if (Array.isArray(value)) return "sequence";
  if (typeof value === "object") return "map";
  if (typeof value === "number") {
    return Number.isInteger(value) ? `integer \`${value}\`` : `floating point \`${value}\``;
  }
  if (typeof value === "string") return `string ${JSON.stringify(value)}`;
  return `boolean \`${String(value)}\``;
}

function serdeError(message: string): Reply {
  return chain(400, "Failed to deserialize JSON", message);
}

/** Group node -> the double whose VM holds it open: one opener per legacy group node (host-vfio-sysfs.md §1). */
const groupOwners = new Map<string, ChDouble>();

/** The group node (<root>/dev/vfio/<group>) of a device path under a fake sysfs root. */
function groupNodeOf(root: string, devicePath: string): string | undefined {
  try {
    return path.join(root, "dev/vfio", path.basename(fs.readlinkSync(path.join(root, devicePath, "iommu_group"))));
  } catch {
    return undefined;
  }
}

/** vfio-ioctls' error for opening `devicePath` under a fake sysfs root, if any (host-vfio-sysfs.md §3, §6). */
function vfioOpenError(root: string, devicePath: string): string | undefined {
  let group: string;
  try {
    group = path.basename(fs.readlinkSync(path.join(root, devicePath, "iommu_group")));
  } catch {
    return "invalid file path";
  }
  if (!fs.existsSync(path.join(root, "dev/vfio", group))) {
    return `failed to open /dev/vfio/${group} group: No such file or directory (os error 2)`;
  }
  const members = path.join(root, "sys/kernel/iommu_groups", group, "devices");
  for (const member of fs.readdirSync(members)) {
    const driverLink = path.join(members, member, "driver");
    if (fs.existsSync(driverLink) && !VIABLE_DRIVER.test(path.basename(fs.readlinkSync(driverLink)))) {
      return "group is not viable";
    }
  }
  return undefined;
}

export class ChDouble {
  /** Every request received, in arrival order. */
  readonly requests: ChRequest[] = [];

  private readonly profile: ChProfile;
  private readonly lifetime = new AbortController();
  private readonly connections = new Set<net.Socket>();
  private peak = 0;
  private readonly faults = new Map<string, ChFault[]>();
  private queue: Promise<void> = Promise.resolve();

  private state: ChVmState | undefined;
  private devices: VfioConfig[] | undefined;
  private disks: DiskConfig[] | undefined;
  private tree: Map<string, TreeNode> | undefined;
  private readonly pendingEject = new Set<string>();
  private nameCounter = 0;
  /** Device id -> the group node the VM holds open for it. */
  private readonly openGroups = new Map<string, string>();
  private vmm: VmmProcess | undefined;

  private constructor(
    private readonly server: net.Server,
    /** The API socket it serves. */
    readonly socketPath: string,
    private readonly options: ChDoubleOptions,
  ) {
    this.profile = options.profile ?? "main";
  }

  /** Listens on `socketPath` with no VM created yet. */
  static async start(socketPath: string, options: ChDoubleOptions = {}): Promise<ChDouble> {
    const server = net.createServer();
    const double = new ChDouble(server, socketPath, options);
    server.on("connection", (socket) => double.accept(socket));
    await listenOn(server, socketPath);
    return double;
  }

  async close(): Promise<void> {
    this.releaseGroups();
    this.lifetime.abort();
    for (const socket of this.connections) socket.destroy();
    await Promise.all([this.vmm?.stop(), new Promise<void>((resolve) => this.server.close(() => resolve()))]);
  }

  /** The next request to `endpoint` ("vm.add-device") meets `fault`; several queue up in order. */
  inject(endpoint: ChEndpoint, fault: ChFault): void {
    this.faults.set(endpoint, [...(this.faults.get(endpoint) ?? []), fault]);
  }

  /**
   * Moves the VM as CH would: "none" drops it; "Created" creates it or, from a
   * booted state, drops the booted VM and keeps its config (vm.shutdown); any
   * booted state from none/Created boots it, naming and placing cold-plugged devices.
   */
  setState(next: ChVmState | "none"): void {
    if (next === "none") {
      this.state = this.devices = this.disks = this.tree = undefined;
      this.pendingEject.clear();
      this.releaseGroups();
      this.nameCounter = 0;
      return;
    }
    if (next === "Created") {
      this.tree = undefined;
      this.pendingEject.clear();
      this.releaseGroups();
    } else if (this.tree === undefined) {
      this.boot();
    }
    this.state = next;
  }

  /** A virtio disk the VM was given (two device_tree nodes, one slot); returns its id. */
  addDisk(id?: string): string {
    this.requireVm();
    const name = id ?? this.nextName("_disk");
    (this.disks ??= []).push({ id: name, path: `/var/lib/vm/${name}.img` });
    if (this.tree !== undefined) this.placeDisk(name);
    return name;
  }

  /** The guest acks the pending unplug of `id`: its node and slot go away. */
  guestEjects(id: string): void {
    if (!this.pendingEject.has(id)) throw new Error(`no removal of ${id} is pending`);
    this.eject(id);
  }

  /** Connections open now. */
  get openConnections(): number {
    return this.connections.size;
  }

  /** The most connections open at once so far. */
  get peakConnections(): number {
    return this.peak;
  }

  /** Takes all of CH's connections, as other API users might; returns what releases them. */
  async occupyAllConnections(): Promise<() => void> {
    const socketPath = this.socketPath;
    const sockets = await Promise.all(
      Array.from({ length: MAX_CONNECTIONS - this.connections.size }, () => {
        return new Promise<net.Socket>((resolve) => {
          const socket = net.connect(socketPath, () => resolve(socket));
        });
      }),
    );
    while (this.connections.size < MAX_CONNECTIONS) await sleep(1);
    return () => sockets.forEach((socket) => socket.destroy());
  }

  /** Ids removed from config whose node still waits for the guest. */
  pendingRemovals(): string[] {
    return [...this.pendingEject];
  }

  /** The VM's stand-in process (holding its open group nodes), once it opened one. */
  get vmmPid(): number | undefined {
    return this.vmm?.pid;
  }

  /** Group nodes the VM holds open now. */
  heldGroups(): string[] {
    return [...new Set(this.openGroups.values())];
  }

  // ---- connections and HTTP framing ----

  private accept(socket: net.Socket): void {
    if (this.connections.size >= MAX_CONNECTIONS) {
      socket.end(SERVER_FULL, () => socket.destroy());
      return;
    }
    this.connections.add(socket);
    this.peak = Math.max(this.peak, this.connections.size);
    socket.on("close", () => this.connections.delete(socket));
    socket.on("error", () => socket.destroy());
    let buffer = Buffer.alloc(0);
    socket.on("data", (chunk: Buffer) => {
      buffer = Buffer.concat([buffer, chunk]);
      for (;;) {
        const parsed = this.parse(buffer);
        if (parsed === "incomplete") return;
        if (typeof parsed === "string") {
          buffer = Buffer.alloc(0);
          this.enqueue(async () => this.write(socket, parseErrorBytes(parsed)));
          return;
        }
        buffer = buffer.subarray(parsed.consumed);
        this.receive(socket, parsed.request);
      }
    });
  }

  /** One request off the front of `buffer`, "incomplete", or micro_http's parse error text. */
  private parse(buffer: Buffer): { request: ParsedRequest; consumed: number } | "incomplete" | string {
    const end = buffer.indexOf("\r\n\r\n");
    if (end < 0) return "incomplete";
    const [requestLine = "", ...headerLines] = buffer.subarray(0, end).toString("latin1").split("\r\n");
    const parts = requestLine.split(" ");
    const [method = "", target = "", version = ""] = parts;
    if (parts.length !== 3) return "Invalid request.";
    const methods = this.profile === "main" ? ["GET", "PUT", "PATCH", "DELETE"] : ["GET", "PUT", "PATCH"];
    if (!methods.includes(method)) return "Invalid HTTP Method: Unsupported HTTP method.";
    if (version !== "HTTP/1.1" && version !== "HTTP/1.0") return "Invalid HTTP Version: Unsupported HTTP version.";
    const headers: Record<string, string> = {};
    for (const line of headerLines) {
      const colon = line.indexOf(":");
      if (colon < 0) return "Invalid header.";
      headers[line.slice(0, colon).trim().toLowerCase()] = line.slice(colon + 1).trim();
    }
    // A chunked body is not decoded: CH sees no body and parses the chunks as the next request.
    const length = headers["content-length"] === undefined ? 0 : Number(headers["content-length"]);
    if (!Number.isInteger(length) || length < 0) return "Invalid header.";
    const consumed = end + 4 + length;
    if (buffer.length < consumed) return "incomplete";
    const body = length > 0 ? buffer.subarray(end + 4, consumed).toString("utf8") : undefined;
    return { request: { method, target, headers, body }, consumed };
  }

  private receive(socket: net.Socket, request: ParsedRequest): void {
    const endpoint = request.target.startsWith(API_ROOT) ? request.target.slice(API_ROOT.length) : request.target;
    let body: unknown = request.body;
    if (request.body !== undefined) {
      try {
        body = JSON.parse(request.body);
      } catch {
        // keep the raw text
      }
    }
    this.requests.push({ method: request.method, endpoint, headers: request.headers, body });
    const fault = this.faults.get(endpoint)?.shift();
    this.enqueue(() => this.answer(socket, request, fault));
  }

  /** Runs jobs one at a time across all connections, as CH's one HTTP thread does. */
  private enqueue(job: () => Promise<void>): void {
    this.queue = this.queue.then(job).catch(() => undefined);
  }

  private async answer(socket: net.Socket, request: ParsedRequest, fault: ChFault | undefined): Promise<void> {
    const aborted = this.lifetime.signal;
    if (fault?.kind === "respond") return this.write(socket, encode(fault));
    if (fault?.kind === "hang") {
      await new Promise((resolve) => aborted.addEventListener("abort", resolve, { once: true }));
      return;
    }
    if (fault?.kind === "delay") await sleep(fault.ms, undefined, { signal: aborted }).catch(() => undefined);
    if (this.options.replyDelayMs) await sleep(this.options.replyDelayMs, undefined, { signal: aborted }).catch(() => undefined);
    if (fault?.kind === "state-first") this.setState(fault.state);
    if (aborted.aborted) return;
    const reply = this.route(request);
    // A device's group is open before CH answers its add (and closed once ejected).
    await this.vmm?.settled();
    const bytes = encode(reply);
    if (fault?.kind === "close-mid-response") {
      const headerEnd = bytes.indexOf("\r\n\r\n") + 4;
      const cut = bytes.length > headerEnd ? headerEnd + Math.floor((bytes.length - headerEnd) / 2) : headerEnd >> 1;
      socket.end(bytes.subarray(0, cut), () => socket.destroy());
      return;
    }
    this.write(socket, bytes);
  }

  private write(socket: net.Socket, bytes: Buffer): void {
    if (!socket.destroyed) socket.write(bytes);
  }

  // ---- routing (vmm/src/api/http/mod.rs) ----

  private route(request: ParsedRequest): Reply {
    const [target = ""] = request.target.split("?");
    const endpoint = target.startsWith(API_ROOT) ? target.slice(API_ROOT.length) : "";
    if (!Object.hasOwn(CH_DOUBLE_ROUTES, endpoint)) return chain(404, "Not Found");
    const served = CH_DOUBLE_ROUTES[endpoint as ChEndpoint];
    if (request.method !== "GET" && request.method !== "PUT") return { status: 400 };
    if (request.method !== served || (served === "PUT" && request.body === undefined)) return chain(400, "Bad Request");
    switch (endpoint as ChEndpoint) {
      case "vmm.ping":
        return this.ping();
      case "vm.info":
        return this.info();
      case "vm.add-device":
        return this.addDevice(request.body ?? "");
      case "vm.remove-device":
        return this.removeDevice(request.body ?? "");
    }
  }

  private ping(): Reply {
    return { status: 200, body: JSON.stringify({ ...VERSIONS[this.profile], pid: process.pid, features: ["kvm"] }) };
  }

  private notCreated(action: string): Reply {
    return chain(this.profile === "v52" ? 500 : 404, "Error from API", action, "VM is not created");
  }

  private info(): Reply {
    if (this.state === undefined) return this.notCreated("The VM info is not available");
    const info: Record<string, unknown> = {
      config: this.configJson(),
      state: this.state,
      memory_actual_size: 1 << 30,
      device_tree: this.tree && Object.fromEntries([...this.tree].map(([id, node]) => [id, this.nodeJson(node)])),
    };
    return { status: 200, body: JSON.stringify(info, (_key, value: unknown) => this.absent(value)) };
  }

  /** An unset optional field: null up to v52, left out from v53 (commit 08bd7727f). */
  private absent(value: unknown): unknown {
    return value === undefined && this.profile === "v52" ? null : value;
  }

  private configJson(): Record<string, unknown> {
    return {
      cpus: { boot_vcpus: 1, max_vcpus: 1 },
      memory: { size: 1 << 30 },
      payload: { kernel: "/var/lib/vm/vmlinux" },
      disks: this.disks?.map((disk) => ({ path: disk.path, id: disk.id })),
      devices: this.devices?.map((device) => ({
        path: device.path,
        id: device.id,
        pci_segment: device.pciSegment,
        iommu: device.iommu || this.profile === "v52" ? device.iommu : undefined,
        pci_device_id: undefined,
        x_nv_gpudirect_clique: undefined,
        x_exclude_mmap_bars: [],
      })),
    };
  }

  private nodeJson(node: TreeNode): Record<string, unknown> {
    const json: Record<string, unknown> = { id: node.id, resources: [], children: node.children };
    if (node.parent !== undefined) json.parent = node.parent;
    if (node.slot !== undefined && node.segment !== undefined) {
      json.resources = [
        {
          PciBar: {
            index: 0,
            base: 0x20_0000_0000 + node.slot * 0x100_0000,
            size: 0x100_0000,
            type_: "Mmio64",
            prefetchable: true,
          },
        },
      ];
      json.pci_bdf = `${node.segment.toString(16).padStart(4, "0")}:00:${node.slot.toString(16).padStart(2, "0")}.0`;
    }
    return json;
  }

  // ---- vm.add-device (vmm/src/lib.rs vm_add_device, device_manager.rs) ----

  private addDevice(text: string): Reply {
    const parsed = this.parseDeviceConfig(text);
    if ("status" in parsed) return parsed;
    if (this.state === undefined) return this.notCreated(ADD);
    const invalid = this.validate(parsed);
    if (invalid !== undefined) return invalid;
    if (this.tree === undefined) {
      // Created, not booted: only the config changes (204).
      (this.devices ??= []).push(parsed);
      return { status: 204 };
    }
    if (parsed.id !== undefined && this.tree.has(parsed.id)) {
      return chain(
        500,
        "Error from API",
        ADD,
        "Error from device manager",
        `Invalid identifier as it is not unique: ${parsed.id}`,
      );
    }
    const openError =
      this.options.sysfsRoot && parsed.path ? vfioOpenError(this.options.sysfsRoot, parsed.path) : undefined;
    if (openError !== undefined) {
      return chain(500, "Error from API", ADD, "Error from device manager", "Cannot create a VFIO device", openError);
    }
    const groupNode = this.options.sysfsRoot && parsed.path ? groupNodeOf(this.options.sysfsRoot, parsed.path) : undefined;
    const owner = groupNode === undefined ? undefined : groupOwners.get(groupNode);
    if (owner !== undefined && owner !== this) {
      // The kernel lets one process open a legacy group node at a time: another VM's CH has it.
      const busy = `failed to open /dev/vfio/${path.basename(groupNode!)} group: Device or resource busy (os error 16)`;
      return chain(500, "Error from API", ADD, "Error from device manager", "Cannot create a VFIO device", busy);
    }
    const slot = this.freeSlot(parsed.pciSegment);
    if (slot === undefined) {
      // Outer text from device_manager.rs NextPciDeviceId; inner from cloud-hypervisor.md §4.
      return chain(
        500,
        "Error from API",
        ADD,
        "Error from device manager",
        "Failed to find an available PCI device ID",
        "Could not find an available device slot on the PCI bus",
      );
    }
    const device = { ...parsed, id: parsed.id ?? this.nextName("_vfio") };
    (this.devices ??= []).push(device);
    this.openGroup(device);
    const node = { id: device.id, children: [], segment: device.pciSegment, slot };
    this.tree.set(device.id, node);
    return { status: 200, body: JSON.stringify({ id: device.id, bdf: this.nodeJson(node).pci_bdf }) };
  }

  /** serde's view of a DeviceConfig body: unknown keys ignored, types checked. */
  private parseDeviceConfig(text: string): VfioConfig | Reply {
    let body: unknown;
    try {
      body = JSON.parse(text);
    } catch {
      return serdeError("expected value at line 1 column 1");
    }
    if (typeof body !== "object" || body === null || Array.isArray(body)) {
      return serdeError(`invalid type: ${jsonKind(body)}, expected struct DeviceConfig`);
    }
    const { path: devicePath, id, pci_segment: segment = 0, iommu = false } = body as Record<string, unknown>;
    if (devicePath !== undefined && typeof devicePath !== "string") {
      return serdeError(`invalid type: ${jsonKind(devicePath)}, expected a string`);
    }
    if (id !== undefined && id !== null && typeof id !== "string") {
      return serdeError(`invalid type: ${jsonKind(id)}, expected a string`);
    }
    if (!Number.isInteger(segment) || (segment as number) < 0 || (segment as number) > 0xffff) {
      return serdeError(`invalid type: ${jsonKind(segment)}, expected u16`);
    }
    if (typeof iommu !== "boolean") return serdeError(`invalid type: ${jsonKind(iommu)}, expected a boolean`);
    if (devicePath === undefined && this.profile === "v52") return serdeError("missing field `path`");
    return { id: id ?? undefined, path: devicePath, pciSegment: segment as number, iommu };
  }

  /** VmConfig::validate on a copy with the device appended. */
  private validate(device: VfioConfig): Reply | undefined {
    const fail = (duplicate: boolean, message: string) =>
      chain(
        this.profile !== "main" ? 500 : duplicate ? 409 : 400,
        "Error from API",
        ADD,
        "Failed to validate config",
        message,
      );
    if (device.id !== undefined && this.configHolds(device.id)) {
      return fail(true, `Identifier ${device.id} is not unique`);
    }
    if (device.path !== undefined && this.devices?.some((d) => d.path === device.path)) {
      return fail(true, `Duplicated device path: ${device.path}`);
    }
    // config.rs ValidationError::InvalidIdentifier, typo included.
    if (device.id?.startsWith("__")) return fail(false, `Identifier ${device.id} is not invalid`);
    if (device.pciSegment >= (this.options.pciSegments ?? 1)) {
      return fail(false, `Invalid PCI segment id: ${device.pciSegment}`);
    }
    // Wording not in the reference: v53 made `path` optional (path xor cdev fd).
    if (device.path === undefined) return fail(false, "Device path or file descriptor required");
    return undefined;
  }

  // ---- vm.remove-device ----

  private removeDevice(text: string): Reply {
    let id: unknown;
    try {
      id = (JSON.parse(text) as { id?: unknown } | null)?.id;
    } catch {
      return serdeError("expected value at line 1 column 1");
    }
    if (id === undefined) return serdeError("missing field `id`");
    if (typeof id !== "string") return serdeError(`invalid type: ${jsonKind(id)}, expected a string`);
    if (this.state === undefined) return this.notCreated(REMOVE);
    if (this.tree === undefined) {
      return this.dropFromConfig(id)
        ? { status: 204 }
        : chain(500, "Error from API", REMOVE, `No device with id "${id}" to remove`);
    }
    const unknown = chain(
      this.profile === "main" ? 404 : 500,
      "Error from API",
      REMOVE,
      "Error from device manager",
      `Failed to find device corresponding to the given identifier: ${id}`,
    );
    if (!this.tree.has(id)) return unknown;
    if (!this.dropFromConfig(id)) {
      // Removal already pending: v53.0 refuses (PR #8559); v52 and main re-notify the guest (PR #8739).
      return this.profile === "v53" ? unknown : { status: 204 };
    }
    this.pendingEject.add(id);
    const delay = this.options.ejectAfterMs;
    if (delay !== undefined) {
      sleep(delay, undefined, { signal: this.lifetime.signal }).then(
        () => this.eject(id),
        () => undefined,
      );
    }
    return { status: 204 };
  }

  private dropFromConfig(id: string): boolean {
    const before = (this.devices?.length ?? 0) + (this.disks?.length ?? 0);
    this.devices = this.devices?.filter((d) => d.id !== id);
    this.disks = this.disks?.filter((d) => d.id !== id);
    return (this.devices?.length ?? 0) + (this.disks?.length ?? 0) < before;
  }

  private eject(id: string): void {
    if (!this.pendingEject.delete(id) || this.tree === undefined) return;
    const parent = this.tree.get(id)?.parent;
    this.tree.delete(id);
    if (parent !== undefined) this.tree.delete(parent);
    this.closeGroup(id);
  }

  /** The VM's CH opens the device's group node (a fake file standing in for it) and keeps it open. */
  private openGroup(device: VfioConfig): void {
    const root = this.options.sysfsRoot;
    if (!root || device.id === undefined || device.path === undefined) return;
    const node = groupNodeOf(root, device.path);
    if (node === undefined) return;
    this.openGroups.set(device.id, node);
    groupOwners.set(node, this);
    this.vmm ??= VmmProcess.spawn("cloud-hypervisor", ["--api-socket", `path=${this.socketPath}`]);
    this.vmm.open(node);
  }

  private closeGroup(id: string): void {
    const node = this.openGroups.get(id);
    if (node === undefined) return;
    this.openGroups.delete(id);
    this.vmm?.close(node);
    if (![...this.openGroups.values()].includes(node) && groupOwners.get(node) === this) groupOwners.delete(node);
  }

  private releaseGroups(): void {
    for (const id of [...this.openGroups.keys()]) this.closeGroup(id);
  }

  // ---- bookkeeping ----

  private requireVm(): void {
    if (this.state === undefined) throw new Error("no VM: call setState first");
  }

  private configHolds(id: string): boolean {
    return [...(this.devices ?? []), ...(this.disks ?? [])].some((d) => d.id === id);
  }

  /** DeviceManager::next_device_name: one counter for every prefix, skipping names in use. */
  private nextName(prefix: string): string {
    for (;;) {
      const name = `${prefix}${this.nameCounter++}`;
      if (!this.tree?.has(name) && !this.configHolds(name)) return name;
    }
  }

  /** Lowest free device number of the segment; 0 on segment 0 is the host bridge. */
  private freeSlot(segment: number): number | undefined {
    const used = new Set([...(this.tree?.values() ?? [])].filter((n) => n.segment === segment).map((n) => n.slot));
    for (let slot = segment === 0 ? 1 : 0; slot < SLOTS_PER_SEGMENT; slot++) if (!used.has(slot)) return slot;
    return undefined;
  }

  private boot(): void {
    this.tree = new Map();
    for (const disk of this.disks ?? []) this.placeDisk((disk.id ??= this.nextName("_disk")));
    for (const device of this.devices ?? []) {
      device.id ??= this.nextName("_vfio");
      this.tree.set(device.id, {
        id: device.id,
        children: [],
        segment: device.pciSegment,
        slot: this.freeSlot(device.pciSegment),
      });
      this.openGroup(device);
    }
  }

  private placeDisk(id: string): void {
    const parent = `_virtio-pci-${id}`;
    this.tree?.set(parent, { id: parent, children: [id], segment: 0, slot: this.freeSlot(0) });
    this.tree?.set(id, { id, parent, children: [] });
  }
}
