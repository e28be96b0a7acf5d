// One method per Cloud Hypervisor endpoint vfiod uses (kata's clhClient shape),
// over the VM's API Unix socket. Facts: ../shared/reference/cloud-hypervisor.md.
//
// Each call opens its own connection and closes it before returning: CH serves at
// most 10 connections and a lingering keep-alive one would hold a slot.
import { Client, errors } from "undici";
import { abortedError, Code, VfiodError, type Reason } from "../../errors";
import { isJsonObject } from "../../json";

/** A `config.devices[]` entry; unset optional fields are null up to v52 and absent after. */
export interface ChDeviceConfig {
  readonly id?: string | null;
  /** Echoed byte for byte as sent. */
  readonly path?: string | null;
  readonly pci_segment?: number | null;
  readonly iommu?: boolean | null;
}

/** A `device_tree` node; a VFIO device is one node keyed by its id. */
export interface ChDeviceNode {
  readonly id?: string;
  readonly parent?: string | null;
  readonly children?: readonly string[];
  /** Guest address, "0000:00:06.0". */
  readonly pci_bdf?: string | null;
}

/** The parts of VmConfig vfiod reads; other sections (disks, net, ...) carry ids too. */
export interface ChVmConfig {
  readonly devices?: readonly ChDeviceConfig[] | null;
  readonly [section: string]: unknown;
}

export interface ChVmInfo {
  /** "Created" | "Running" | "Paused" | "Shutdown" | "BreakPoint". */
  readonly state: string;
  readonly config: ChVmConfig;
  /** Null (≤v52) or absent (v53+) until the VM boots. */
  readonly device_tree?: Readonly<Record<string, ChDeviceNode>> | null;
}

export interface ChVmmPing {
  /** Cargo version, e.g. "53.0.0". */
  readonly version: string;
  readonly build_version?: string;
  readonly pid?: number;
  readonly features?: readonly string[];
}

export interface ChAddDevice {
  readonly path: string;
  readonly id?: string;
}

/** add-device's 200 body: the id CH used and the guest BDF. */
export interface ChPciDeviceInfo {
  readonly id: string;
  readonly bdf: string;
}

/** Substrings of CH's error chains that mean something to vfiod (cloud-hypervisor.md §3, §4). */
const RECOGNISED: ReadonlyArray<readonly [string, Reason]> = [
  // Duplicate id in config, and an id whose removal is still pending.
  ["is not unique", "ID_IN_USE"],
  ["Duplicated device path", "DEVICE_ALREADY_ATTACHED"],
  ["Failed to find device corresponding to the given identifier", "DEVICE_NOT_ATTACHED"],
  ["VM is not created", "VM_NOT_RUNNING"],
  ["Could not find an available device slot", "NO_FREE_SLOT"],
];

/** Transport error codes, said without the socket path undici puts in its messages. */
const UNREACHABLE: Readonly<Record<string, string>> = {
  ENOENT: "api socket does not exist",
  ECONNREFUSED: "connection refused",
  EACCES: "permission denied on the api socket",
  ECONNRESET: "connection reset",
  EPIPE: "connection reset",
  UND_ERR_SOCKET: "connection closed before a complete reply",
  UND_ERR_CLOSED: "connection closed before a complete reply",
  UND_ERR_RES_CONTENT_LENGTH_MISMATCH: "connection closed before a complete reply",
  UND_ERR_CONNECT_TIMEOUT: "connect timed out",
};

const MAX_TEXT = 1000;

function shorten(text: string): string {
  return text.length > MAX_TEXT ? `${text.slice(0, MAX_TEXT)}...` : text;
}

/**
 * CH's error text: the JSON array of the error chain joined with ": " (v47+), or
 * the plain line older versions send; undefined for anything else: an empty body
 * (wrong method) or micro_http's own `{ "error": ... }` for a request it could
 * not parse, both meaning vfiod sent something CH cannot read.
 */
function errorText(body: string): string | undefined {
  const trimmed = body.trim();
  if (trimmed === "") return undefined;
  try {
    const parsed: unknown = JSON.parse(trimmed);
    return Array.isArray(parsed) && parsed.every((m) => typeof m === "string") ? parsed.join(": ") : undefined;
  } catch {
    return trimmed.startsWith("{") || trimmed.startsWith("[") ? undefined : trimmed;
  }
}

function isOptional(value: unknown, check: (v: unknown) => boolean): boolean {
  return value === undefined || value === null || check(value);
}

function isVmInfo(value: unknown): value is ChVmInfo {
  return (
    isJsonObject(value) &&
    typeof value.state === "string" &&
    isJsonObject(value.config) &&
    isOptional(value.config.devices, (d) => Array.isArray(d) && d.every(isJsonObject)) &&
    isOptional(value.device_tree, (t) => isJsonObject(t) && Object.values(t).every(isJsonObject))
  );
}

interface Reply {
  readonly status: number;
  readonly body: string;
}

export class CloudHypervisorClient {
  /**
   * @param socketPath the VM's `--api-socket` path; never put into messages.
   * @param vmName names the VM in every message.
   */
  constructor(
    private readonly socketPath: string,
    private readonly vmName: string,
  ) {}

  /** GET /vmm.ping: the VMM's version; answers whether or not a VM exists. */
  async ping(signal: AbortSignal): Promise<ChVmmPing> {
    const reply = await this.call("GET", "vmm.ping", undefined, signal);
    const body = this.parseJson("vmm.ping", reply);
    if (!isJsonObject(body) || typeof body.version !== "string") throw this.unparseable("vmm.ping", reply);
    return body as unknown as ChVmmPing;
  }

  /**
   * GET /vm.info: state, config and device_tree.
   * @throws VM_NOT_RUNNING when no VM is created (404 v53+, 500 ≤v52).
   */
  async vmInfo(signal: AbortSignal): Promise<ChVmInfo> {
    const reply = await this.call("GET", "vm.info", undefined, signal);
    const body = this.parseJson("vm.info", reply);
    if (!isVmInfo(body)) throw this.unparseable("vm.info", reply);
    return body;
  }

  /**
   * PUT /vm.add-device. Not idempotent: never retry it (a retry after a lost
   * reply fails as a duplicate id or path).
   * @returns CH's id and guest BDF (200), or undefined when only the config
   *   changed because the VM is not booted (204).
   */
  async addDevice(device: ChAddDevice, signal: AbortSignal): Promise<ChPciDeviceInfo | undefined> {
    const reply = await this.call("PUT", "vm.add-device", JSON.stringify(device), signal);
    if (reply.status === 204) return undefined;
    const body = this.parseJson("vm.add-device", reply);
    if (!isJsonObject(body) || typeof body.id !== "string" || typeof body.bdf !== "string") {
      throw this.unparseable("vm.add-device", reply);
    }
    return { id: body.id, bdf: body.bdf };
  }

  /**
   * PUT /vm.remove-device. A 204 only means "requested": the node stays in
   * device_tree until the guest ejects (CH #8763).
   */
  async removeDevice(id: string, signal: AbortSignal): Promise<void> {
    await this.call("PUT", "vm.remove-device", JSON.stringify({ id }), signal);
  }

  /** One request on its own connection; a 2xx reply, or the VfiodError for anything else. */
  private async call(
    method: "GET" | "PUT",
    endpoint: string,
    body: string | undefined,
    signal: AbortSignal,
  ): Promise<Reply> {
    const what = `cloud-hypervisor vm ${this.vmName}: ${endpoint}`;
    if (signal.aborted) throw abortedError(signal, what);
    // The caller's signal is the only bound: a first VFIO add maps all guest RAM
    // and can outlast undici's 300 s defaults (cloud-hypervisor.md §1).
    const client = new Client("http://localhost", { socketPath: this.socketPath, headersTimeout: 0, bodyTimeout: 0 });
    let reply: Reply;
    try {
      // A string body goes out with Content-Length; CH does not decode chunked bodies.
      const payload = body === undefined ? {} : { body, headers: { "content-type": "application/json" } };
      const response = await client.request({ path: `/api/v1/${endpoint}`, method, signal, ...payload });
      reply = { status: response.statusCode, body: await response.body.text() };
    } catch (err) {
      if (signal.aborted) throw abortedError(signal, what);
      throw this.transportError(what, err);
    } finally {
      await client.destroy();
    }
    if (reply.status >= 200 && reply.status < 300) return reply;
    throw this.refusal(what, reply);
  }

  private transportError(what: string, err: unknown): VfiodError {
    if (err instanceof errors.HTTPParserError) {
      return new VfiodError("HYPERVISOR_ERROR", `${what}: malformed HTTP reply`, { code: Code.INTERNAL, cause: err });
    }
    const code = (err as { code?: unknown } | null)?.code;
    const phrase = typeof code === "string" ? UNREACHABLE[code] : undefined;
    return new VfiodError("HYPERVISOR_UNAVAILABLE", `${what}: api unreachable (${phrase ?? "connection failed"})`, {
      cause: err,
    });
  }

  private refusal(what: string, reply: Reply): VfiodError {
    const cause = new Error(`HTTP ${reply.status}: ${reply.body}`);
    // Only micro_http itself answers 503: more than 10 connections are open.
    if (reply.status === 503) {
      return new VfiodError("HYPERVISOR_UNAVAILABLE", `${what}: too many open api connections`, { cause });
    }
    const text = errorText(reply.body);
    const message = `${what}: ${shorten(text ?? reply.body.trim())}`;
    const recognised = text === undefined ? undefined : RECOGNISED.find(([needle]) => text.includes(needle));
    if (recognised !== undefined) return new VfiodError(recognised[1], message, { cause });
    const code = reply.status < 500 && text !== undefined ? Code.FAILED_PRECONDITION : Code.INTERNAL;
    return new VfiodError("HYPERVISOR_ERROR", message, { code, cause });
  }

  private parseJson(endpoint: string, reply: Reply): unknown {
    try {
      return JSON.parse(reply.body);
    } catch {
      throw this.unparseable(endpoint, reply);
    }
  }

  private unparseable(endpoint: string, reply: Reply): VfiodError {
    return new VfiodError(
      "HYPERVISOR_ERROR",
      `cloud-hypervisor vm ${this.vmName}: ${endpoint}: unparseable reply: ${shorten(reply.body)}`,
      { code: Code.INTERNAL, cause: new Error(`HTTP ${reply.status}: ${reply.body}`) },
    );
  }
}
