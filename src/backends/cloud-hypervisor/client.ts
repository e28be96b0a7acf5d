// One method per Cloud Hypervisor endpoint vfiod uses (kata's clhClient shape),
// over the VM's API Unix socket, and the one owner of every connection vfiod opens
// to such a socket. Facts: ../shared/reference/cloud-hypervisor.md.
//
// CH serves at most 10 connections per socket (the 11th gets a raw 503) and answers
// one request at a time on one thread (§1). So vfiod uses at most
// CONNECTIONS_PER_SOCKET of them, queues the rest in arrival order within each
// caller's deadline, lets concurrent vm.info reads share one request sent after
// they arrived, closes idle connections at once so they hold no slot, and retries a
// read that met the 503 (someone else holds the slots) with backoff; never an
// add-device or remove-device.
import { setTimeout as sleep } from "node:timers/promises";
import { Pool, errors } from "undici";
import { abortedError, Code, VfiodError, type Reason } from "../../errors";
import { FreshReads } from "../../fresh-reads";
import { observed, unobserved, type HypervisorCallObserver } from "../../hypervisor-calls";
import { isJsonObject } from "../../json";
import { KeyedLocks } from "../../keyed-locks";
import { withinBound } from "../../request-bound";
import { SENT_REQUEST_LIMIT_MS } from "../sent-request";

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
  // The kernel refused to open the device's VFIO group: another process holds it (EBUSY).
  ["Device or resource busy", "DEVICE_IN_USE"],
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

/**
 * Connections vfiod opens to one CH API socket. CH answers one request at a time,
 * so more would add no throughput; two let a read go out beside a slow request's
 * connection, and leave 8 of CH's 10 to cocoon's CLI, ch-remote and operators.
 */
export const CONNECTIONS_PER_SOCKET = 2;
/** A connection idle this long is closed: an open one holds one of CH's 10 slots. */
const IDLE_CONNECTION_MS = 500;
/** A socket's pool unused this long is dropped (its VM may be gone). */
const IDLE_POOL_MS = 60_000;
/** Backoff between retries of a read CH refused with 503 (too many connections). */
const RETRY_FIRST_MS = 20;
const RETRY_MAX_MS = 500;

interface SocketState {
  readonly pool: Pool;
  lastUsed: number;
}

/**
 * The one owner of vfiod's connections to Cloud Hypervisor API sockets: a
 * connection limit and an arrival-order queue per socket, shared fresh vm.info
 * reads, and vfiod's bound on every request (--hypervisor-timeout).
 */
export class CloudHypervisorSockets {
  private readonly slots = new KeyedLocks(CONNECTIONS_PER_SOCKET);
  private readonly infoReads = new FreshReads<ChVmInfo>();
  private readonly sockets = new Map<string, SocketState>();
  private readonly sweeper: NodeJS.Timeout;

  /**
   * @param requestTimeoutMs vfiod's bound on each read, whatever the caller's deadline.
   * @param observe told of every request once it ends (metrics).
   */
  constructor(
    readonly requestTimeoutMs: number,
    private readonly observe: HypervisorCallObserver = unobserved,
  ) {
    this.sweeper = setInterval(() => this.dropIdlePools(), IDLE_POOL_MS).unref();
  }

  /** The client for one VM's API socket (cheap: connections are kept here). */
  client(socketPath: string, vmName: string): CloudHypervisorClient {
    return new CloudHypervisorClient(this, socketPath, vmName);
  }

  /** Callers queued per socket now, beyond those with a connection. */
  queues(): [string, number][] {
    return this.slots.queues();
  }

  /** Closes every connection (at shutdown). */
  async close(): Promise<void> {
    clearInterval(this.sweeper);
    const pools = [...this.sockets.values()].map((state) => state.pool);
    this.sockets.clear();
    await Promise.all(pools.map((pool) => pool.destroy()));
  }

  /**
   * One vm.info read shared by every caller that arrived before it was sent. It
   * runs on vfiod's bound alone: a caller that gives up leaves it to the others.
   */
  sharedInfo(socketPath: string, signal: AbortSignal, what: string, read: () => Promise<ChVmInfo>): Promise<ChVmInfo> {
    return this.infoReads.read(socketPath, signal, what, read);
  }

  /**
   * Sends one request once a connection of the socket is free, in arrival order.
   * A caller whose signal aborts while queued sends nothing; once sent, the reply
   * is awaited within `sentSignal()` (the caller's, or a mutation's own bound).
   */
  async send(
    socketPath: string,
    what: string,
    queueSignal: AbortSignal,
    sentSignal: () => AbortSignal,
    request: { method: "GET" | "PUT"; path: string; body?: string },
  ): Promise<Reply> {
    const gaveUp = () => abortedError(queueSignal, what);
    return this.slots.run(socketPath, queueSignal, gaveUp, async () => {
      const signal = sentSignal();
      const state = this.pool(socketPath);
      // A string body goes out with Content-Length; CH does not decode chunked bodies.
      const payload = request.body === undefined ? {} : { body: request.body, headers: { "content-type": "application/json" } };
      try {
        return await observed(this.observe, "cloud-hypervisor", request.path.replace(/^\/api\/v1\//, ""), async () => {
          const response = await state.pool.request({ path: request.path, method: request.method, signal, ...payload });
          return { status: response.statusCode, body: await response.body.text() };
        });
      } finally {
        state.lastUsed = Date.now();
      }
    });
  }

  private pool(socketPath: string): SocketState {
    let state = this.sockets.get(socketPath);
    if (state === undefined) {
      const pool = new Pool("http://localhost", {
        socketPath,
        connections: CONNECTIONS_PER_SOCKET,
        pipelining: 1,
        keepAliveTimeout: IDLE_CONNECTION_MS,
        keepAliveMaxTimeout: IDLE_CONNECTION_MS,
        // vfiod's own bounds apply instead: a first VFIO add maps all guest RAM
        // and can outlast undici's 300 s defaults (cloud-hypervisor.md §1).
        headersTimeout: 0,
        bodyTimeout: 0,
      });
      state = { pool, lastUsed: Date.now() };
      this.sockets.set(socketPath, state);
    }
    return state;
  }

  private dropIdlePools(): void {
    const now = Date.now();
    for (const [socketPath, state] of this.sockets) {
      if (now - state.lastUsed < IDLE_POOL_MS || this.slots.waiting(socketPath) > 0) continue;
      this.sockets.delete(socketPath);
      void state.pool.close().catch(() => undefined);
    }
  }
}

export class CloudHypervisorClient {
  /**
   * @param socketPath the VM's `--api-socket` path; never put into messages.
   * @param vmName names the VM in every message.
   */
  constructor(
    private readonly sockets: CloudHypervisorSockets,
    private readonly socketPath: string,
    private readonly vmName: string,
  ) {}

  /** GET /vmm.ping: the VMM's version and pid; answers whether or not a VM exists. */
  async ping(signal: AbortSignal): Promise<ChVmmPing> {
    const reply = await this.read("vmm.ping", signal);
    const body = this.parseJson("vmm.ping", reply);
    if (!isJsonObject(body) || typeof body.version !== "string") throw this.unparseable("vmm.ping", reply);
    return body as unknown as ChVmmPing;
  }

  /**
   * GET /vm.info: state, config and device_tree, read after this call began;
   * concurrent callers share the read.
   * @throws VM_NOT_RUNNING when no VM is created (404 v53+, 500 ≤v52).
   */
  vmInfo(signal: AbortSignal): Promise<ChVmInfo> {
    const what = this.what("vm.info");
    return this.sockets.sharedInfo(this.socketPath, signal, what, async () => {
      const reply = await this.read("vm.info", undefined);
      const body = this.parseJson("vm.info", reply);
      if (!isVmInfo(body)) throw this.unparseable("vm.info", reply);
      return body;
    });
  }

  /**
   * PUT /vm.add-device. Not idempotent: never retried (a retry after a lost
   * reply fails as a duplicate id or path). Nothing is sent once `signal` has
   * aborted; once sent, the reply is awaited whatever the caller does.
   * @returns CH's id and guest BDF (200), or undefined when only the config
   *   changed because the VM is not booted (204).
   */
  async addDevice(device: ChAddDevice, signal: AbortSignal): Promise<ChPciDeviceInfo | undefined> {
    const reply = await this.mutate("vm.add-device", JSON.stringify(device), signal);
    if (reply.status === 204) return undefined;
    const body = this.parseJson("vm.add-device", reply);
    if (!isJsonObject(body) || typeof body.id !== "string" || typeof body.bdf !== "string") {
      throw this.unparseable("vm.add-device", reply);
    }
    return { id: body.id, bdf: body.bdf };
  }

  /**
   * PUT /vm.remove-device, sent as addDevice is. A 204 only means "requested":
   * the node stays in device_tree until the guest ejects (CH #8763).
   */
  async removeDevice(id: string, signal: AbortSignal): Promise<void> {
    await this.mutate("vm.remove-device", JSON.stringify({ id }), signal);
  }

  private what(endpoint: string): string {
    return `cloud-hypervisor vm ${this.vmName}: ${endpoint}`;
  }

  /**
   * A GET within vfiod's bound (and the caller's signal, for a read not shared),
   * retried with backoff while CH answers 503 (its slots are taken).
   */
  private read(endpoint: string, signal: AbortSignal | undefined): Promise<Reply> {
    const what = this.what(endpoint);
    return withinBound(signal, this.sockets.requestTimeoutMs, what, async (bounded) => {
      for (let delay = RETRY_FIRST_MS; ; delay = Math.min(delay * 2, RETRY_MAX_MS)) {
        try {
          return await this.call("GET", endpoint, undefined, bounded, () => bounded);
        } catch (err) {
          if (!(err instanceof TooManyConnections)) throw err;
          try {
            await sleep(delay, undefined, { signal: bounded });
          } catch {
            throw err;
          }
        }
      }
    });
  }

  private mutate(endpoint: string, body: string, signal: AbortSignal): Promise<Reply> {
    return this.call("PUT", endpoint, body, signal, () => AbortSignal.timeout(SENT_REQUEST_LIMIT_MS));
  }

  /** One request; a 2xx reply, or the VfiodError for anything else. */
  private async call(
    method: "GET" | "PUT",
    endpoint: string,
    body: string | undefined,
    queueSignal: AbortSignal,
    sentSignal: () => AbortSignal,
  ): Promise<Reply> {
    const what = this.what(endpoint);
    let sent: AbortSignal | undefined;
    let reply: Reply;
    try {
      const request = { method, path: `/api/v1/${endpoint}`, ...(body === undefined ? {} : { body }) };
      reply = await this.sockets.send(this.socketPath, what, queueSignal, () => (sent = sentSignal()), request);
    } catch (err) {
      if (err instanceof VfiodError) throw err;
      if (sent?.aborted) throw abortedError(sent, what);
      throw this.transportError(what, err);
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
    if (reply.status === 503) return new TooManyConnections(what, cause);
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

/** CH's 503 past 10 open connections: other API clients hold every slot. */
class TooManyConnections extends VfiodError {
  constructor(what: string, cause: Error) {
    super("HYPERVISOR_UNAVAILABLE", `${what}: too many open api connections (other clients hold all of them)`, { cause });
  }
}
