// A fake QEMU monitor for what real QEMU cannot show here without VFIO hardware:
// a vfio-pci that realizes, DEVICE_DELETED after a delay or never, a guest that
// blinks through a native PCIe unplug, a monitor that hangs up before or after
// running a command, or never greets. It speaks QMP as qemu-qmp.md §1 measured
// it and replays the error texts of §3-§4 verbatim.
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { listenOn } from "./listen";

export interface QmpDoubleOptions {
  /** query-status: "running" (default; firmware has numbered the buses), "paused", "prelaunch". */
  readonly status?: string;
  /** pcie-root-ports rp1..rpN on pcie.0 slots 1..N (default 2). */
  readonly rootPorts?: number;
  /** Host BDFs whose sysfs directory exists; vfio-pci of any other fails "no such host device". */
  readonly hostDevices?: readonly string[];
  /** Host BDF -> IOMMU group that is not viable. */
  readonly nonViable?: Readonly<Record<string, number>>;
  /** Devices present at start, e.g. `{ id: "nic1", driver: "e1000e", bus: "rp1" }`. */
  readonly devices?: readonly { readonly id: string; readonly driver: string; readonly bus: string; readonly sysfsdev?: string }[];
  /** When the guest acknowledges a device_del; null: never (default 50 ms). */
  readonly unplugAfterMs?: number | null;
  /**
   * How the root ports hot-plug (qemu-qmp.md §2, §4), which decides the answer to a
   * device_del repeated while the guest has not acknowledged the first:
   * - "acpi" (default; q35 in 7.2): `{}`, and the request is sent to the guest again;
   * - "native" PCIe: within `nativeUnplugRepeatMs` of the request "Device X is already
   *   in the process of unplug" (qdev-monitor.c), later "Hot-unplug failed: guest is busy
   *   (power indicator blinking)" (hw/pci/pcie.c): the double's guest blinks until it acks.
   *   (A VM with no guest OS never blinks; QEMU then presses the button again: not modelled.)
   */
  readonly hotplug?: "acpi" | "native";
  /** Native hot-plug: how long a pending device_del refuses repeats as "already in the process of unplug" (QEMU: 5000 ms). */
  readonly nativeUnplugRepeatMs?: number;
  /** A command the monitor runs and then closes on without replying: it took effect, its reply is lost. */
  readonly hangUpAfter?: string;
  /** A command the monitor closes on without running it: written just before QEMU went away (§1). */
  readonly hangUpBefore?: string;
  /** false: a monitor that accepts connections and never greets. */
  readonly greets?: boolean;
}

interface Device {
  readonly driver: string;
  readonly bus: string;
  readonly sysfsdev?: string;
  /** When the first device_del was accepted (Date.now()); undefined: no removal pending. */
  unplugRequestedAt?: number;
}

interface Session {
  readonly socket: net.Socket;
  input: string;
  negotiated: boolean;
}

export type QmpReply = { return: unknown } | { error: { class: string; desc: string } };
/** What the double did with a command: its reply, or "hung up" when it closed instead (before or after running it). */
export type QmpAnswer = QmpReply | "hung up";

/** pcie.c: a native unplug request blocks repeats for 5 s (pending_deleted_expires_ms). */
const NATIVE_UNPLUG_REPEAT_MS = 5000;

const QEMU_ID = /^[A-Za-z][A-Za-z0-9._-]*$/;

export class QmpDouble {
  /** Every command received, in order, including refused ones. */
  readonly log: { execute: string; arguments?: Record<string, unknown> }[] = [];
  /** What the double answered each command of `log`, at the same index. */
  readonly answers: QmpAnswer[] = [];
  readonly socket: string;

  private readonly status: string;
  private readonly ports: string[];
  private readonly devices = new Map<string, Device>();
  private readonly timers = new Set<NodeJS.Timeout>();
  private active: Session | undefined;
  private readonly waiting: Session[] = [];

  private constructor(
    private readonly server: net.Server,
    private readonly dir: string,
    private readonly options: QmpDoubleOptions,
  ) {
    this.socket = path.join(dir, "qmp.sock");
    this.status = options.status ?? "running";
    this.ports = Array.from({ length: options.rootPorts ?? 2 }, (_, i) => `rp${i + 1}`);
    for (const d of options.devices ?? []) this.devices.set(d.id, { ...d });
  }

  static async start(options: QmpDoubleOptions = {}): Promise<QmpDouble> {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), "vfiod-"));
    const server = net.createServer();
    const double = new QmpDouble(server, dir, options);
    server.on("connection", (socket) => double.accept(socket));
    await listenOn(server, double.socket);
    return double;
  }

  /** The commands received with this name. */
  commands(execute: string): { execute: string; arguments?: Record<string, unknown> }[] {
    return this.log.filter((c) => c.execute === execute);
  }

  /** What the double answered to the commands received with this name, in order. */
  answersTo(execute: string): QmpAnswer[] {
    return this.answers.filter((_, i) => this.log[i]?.execute === execute);
  }

  /** The guest acknowledges every pending removal now; with no client connected the events are lost, as in QEMU. */
  completeUnplugs(): void {
    for (const [id, device] of this.devices) if (device.unplugRequestedAt !== undefined) this.remove(id);
  }

  async close(): Promise<void> {
    for (const timer of this.timers) clearTimeout(timer);
    for (const session of [this.active, ...this.waiting]) session?.socket.destroy();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
    fs.rmSync(this.dir, { recursive: true, force: true });
  }

  private accept(socket: net.Socket): void {
    const session: Session = { socket, input: "", negotiated: false };
    socket.setEncoding("utf8");
    socket.on("data", (chunk: string) => {
      session.input += chunk;
      if (session === this.active) this.consume(session);
    });
    socket.on("error", () => undefined);
    socket.on("close", () => {
      if (session !== this.active) return;
      // One client at a time: the next one is greeted only now, its queued input then runs (§1).
      this.active = undefined;
      const next = this.waiting.shift();
      if (next !== undefined) this.activate(next);
    });
    if (this.active === undefined) this.activate(session);
    else this.waiting.push(session);
  }

  private activate(session: Session): void {
    if (session.socket.destroyed) {
      const next = this.waiting.shift();
      if (next !== undefined) this.activate(next);
      return;
    }
    this.active = session;
    if (this.options.greets === false) return;
    this.send(session, {
      QMP: { version: { qemu: { micro: 22, minor: 2, major: 7 }, package: "qmp-double" }, capabilities: ["oob"] },
    });
    this.consume(session);
  }

  /** Runs each complete JSON object as soon as it is parsed; QEMU needs no newline (§1). */
  private consume(session: Session): void {
    for (let end = objectEnd(session.input); end > 0 && session === this.active; end = objectEnd(session.input)) {
      const text = session.input.slice(0, end);
      session.input = session.input.slice(end);
      let request: { execute?: unknown; arguments?: Record<string, unknown>; id?: unknown };
      try {
        request = JSON.parse(text);
      } catch (err) {
        // Found before the id is read, so the reply carries none (§1).
        this.send(session, { error: { class: "GenericError", desc: `JSON parse error, ${(err as Error).message}` } });
        continue;
      }
      const execute = String(request.execute);
      this.log.push(request.arguments === undefined ? { execute } : { execute, arguments: request.arguments });
      if (execute === this.options.hangUpBefore) {
        this.answers.push("hung up");
        session.socket.destroy();
        return;
      }
      const reply = this.run(session, execute, request.arguments ?? {});
      if (execute === this.options.hangUpAfter) {
        this.answers.push("hung up");
        session.socket.destroy();
        return;
      }
      this.answers.push(reply);
      this.send(session, request.id === undefined ? reply : { ...reply, id: request.id });
    }
  }

  private run(session: Session, execute: string, args: Record<string, unknown>): QmpReply {
    if (execute === "qmp_capabilities") {
      if (session.negotiated) return fail("CommandNotFound", "Capabilities negotiation is already complete, command ignored");
      session.negotiated = true;
      return { return: {} };
    }
    if (!session.negotiated) return fail("CommandNotFound", "Expecting capabilities negotiation with 'qmp_capabilities'");
    switch (execute) {
      case "query-status":
        return { return: { status: this.status, singlestep: false, running: this.status === "running" } };
      case "qom-list":
        return this.qomList(String(args.path));
      case "qom-get":
        return this.qomGet(String(args.path), String(args.property));
      case "query-pci":
        return { return: this.queryPci() };
      case "device_add":
        return this.deviceAdd(args);
      case "device_del":
        return this.deviceDel(String(args.id));
      default:
        return fail("CommandNotFound", `The command ${execute} has not been found`);
    }
  }

  private qomList(at: string): QmpReply {
    if (at === "/machine/peripheral") {
      const children = [
        ...this.ports.map((name) => ({ name, type: "child<pcie-root-port>" })),
        ...[...this.devices].map(([name, d]) => ({ name, type: `child<${d.driver}>` })),
      ];
      return { return: [{ name: "type", type: "string" }, ...children] };
    }
    const port = /^\/machine\/peripheral\/([^/]+)\/\1$/.exec(at)?.[1];
    if (port === undefined || !this.ports.includes(port)) return fail("DeviceNotFound", `Device '${at}' not found`);
    // A device on the port shows as a child[N] link, also while its removal is pending (§5).
    const links = this.onPort(port).map(([, d], i) => ({ name: `child[${i}]`, type: `link<${d.driver}>` }));
    return {
      return: [
        { name: "type", type: "string" },
        ...links,
        { name: "realized", type: "bool" },
        { name: "acpi-pcihp-bsel", type: "uint32" },
        { name: "hotplug-handler", type: "link<hotplug-handler>" },
      ],
    };
  }

  private qomGet(at: string, property: string): QmpReply {
    const id = /^\/machine\/peripheral\/([^/]+)$/.exec(at)?.[1] ?? "";
    const driver = this.devices.get(id)?.driver ?? (this.ports.includes(id) ? "pcie-root-port" : undefined);
    if (driver === undefined) return fail("DeviceNotFound", `Device '${at}' not found`);
    if (property === "type") return { return: driver };
    const sysfsdev = this.devices.get(id)?.sysfsdev;
    if (driver === "vfio-pci" && sysfsdev !== undefined) {
      if (property === "sysfsdev") return { return: sysfsdev };
      if (property === "host") return { return: path.basename(sysfsdev) };
    }
    return fail("GenericError", `Property '${driver}.${property}' not found`);
  }

  private deviceAdd(args: Record<string, unknown>): QmpReply {
    const id = String(args.id);
    const bus = args.bus === undefined ? "pcie.0" : String(args.bus);
    const driver = String(args.driver);
    if (!QEMU_ID.test(id)) return fail("GenericError", "Parameter 'id' expects an identifier");
    if (this.devices.has(id) || this.ports.includes(id)) return fail("GenericError", `Duplicate device ID '${id}'`);
    if (bus === "pcie.0") return fail("GenericError", "Bus 'pcie.0' does not support hotplugging");
    if (!this.ports.includes(bus)) return fail("GenericError", `Bus '${bus}' not found`);
    // An occupied port is not refused without an explicit addr (§3): callers must pick an empty one.
    let sysfsdev: string | undefined;
    if (driver === "vfio-pci") {
      sysfsdev = typeof args.sysfsdev === "string" ? args.sysfsdev : undefined;
      if (sysfsdev === undefined) return fail("GenericError", "No provided host device");
      const bdf = path.basename(sysfsdev);
      if (!(this.options.hostDevices ?? []).includes(bdf)) {
        return fail("GenericError", `vfio ${sysfsdev}: no such host device: No such file or directory`);
      }
      if ([...this.devices.values()].some((d) => d.sysfsdev === sysfsdev)) {
        return fail("GenericError", `vfio ${bdf}: device is already attached`);
      }
      const group = this.options.nonViable?.[bdf];
      if (group !== undefined) return fail("GenericError", `vfio ${bdf}: group ${group} is not viable`);
    }
    this.devices.set(id, { driver, bus, sysfsdev });
    return { return: {} };
  }

  private deviceDel(id: string): QmpReply {
    const device = this.devices.get(id);
    if (device === undefined) return fail("DeviceNotFound", `Device '${id}' not found`);
    if (device.unplugRequestedAt !== undefined) return this.repeatedDeviceDel(id, device.unplugRequestedAt);
    device.unplugRequestedAt = Date.now();
    const after = this.options.unplugAfterMs === undefined ? 50 : this.options.unplugAfterMs;
    if (after !== null) {
      const timer = setTimeout(() => {
        this.timers.delete(timer);
        this.remove(id);
      }, after);
      this.timers.add(timer);
    }
    return { return: {} };
  }

  /** A device_del while the guest has not acknowledged the first one (§4). */
  private repeatedDeviceDel(id: string, requestedAt: number): QmpReply {
    // ACPI (Debian's 7.2.22, "acpi: pcihp: allow repeating hot-unplug requests"): the guest
    // is notified again. The guest removal already scheduled stays the one that completes.
    if ((this.options.hotplug ?? "acpi") === "acpi") return { return: {} };
    // Native PCIe: qmp_device_del refuses while pending_deleted_expires_ms lies ahead; after
    // that pcie_cap_slot_unplug_request_cb refuses while the guest blinks the power indicator.
    if (Date.now() < requestedAt + (this.options.nativeUnplugRepeatMs ?? NATIVE_UNPLUG_REPEAT_MS)) {
      return fail("GenericError", `Device ${id} is already in the process of unplug`);
    }
    return fail("GenericError", "Hot-unplug failed: guest is busy (power indicator blinking)");
  }

  private remove(id: string): void {
    this.devices.delete(id);
    const session = this.active;
    // Events reach only a negotiated client; with none connected they are lost (§1).
    if (session === undefined || !session.negotiated) return;
    const now = Date.now();
    this.send(session, {
      timestamp: { seconds: Math.floor(now / 1000), microseconds: (now % 1000) * 1000 },
      event: "DEVICE_DELETED",
      data: { device: id, path: `/machine/peripheral/${id}` },
    });
  }

  private onPort(port: string): [string, Device][] {
    return [...this.devices].filter(([, d]) => d.bus === port);
  }

  /** Bus 0 with the root ports; devices behind a port appear once firmware numbered its bus (§5). */
  private queryPci(): unknown[] {
    const numbered = this.status !== "prelaunch";
    const ports = this.ports.map((port, i) => {
      const secondary = numbered ? i + 1 : 0;
      const behind = this.onPort(port).map(([qdev_id]) => ({ bus: secondary, slot: 0, function: 0, qdev_id }));
      return {
        bus: 0,
        slot: i + 1,
        function: 0,
        qdev_id: port,
        class_info: { class: 1540, desc: "PCI bridge" },
        pci_bridge: {
          bus: { number: 0, secondary, subordinate: secondary },
          ...(numbered && behind.length > 0 ? { devices: behind } : {}),
        },
      };
    });
    return [{ bus: 0, devices: [{ bus: 0, slot: 0, function: 0, qdev_id: "", class_info: { class: 1536, desc: "Host bridge" } }, ...ports] }];
  }

  private send(session: Session, message: unknown): void {
    // Every server message is one JSON object ending in "\r\n" (§1).
    if (!session.socket.destroyed) session.socket.write(`${JSON.stringify(message)}\r\n`);
  }
}

function fail(qmpClass: string, desc: string): QmpReply {
  return { error: { class: qmpClass, desc } };
}

/** Length of the first complete top-level JSON object in `text` (leading junk included), or 0. */
function objectEnd(text: string): number {
  let depth = 0;
  let inString = false;
  for (let i = 0; i < text.length; i++) {
    const c = text[i];
    if (inString) {
      if (c === "\\") i++;
      else if (c === '"') inString = false;
    } else if (c === '"') inString = true;
    else if (c === "{") depth++;
    else if (c === "}" && depth > 0 && --depth === 0) return i + 1;
  }
  return 0;
}
