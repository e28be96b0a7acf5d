// A client for one short session with a QEMU monitor over QMP
// (../shared/reference/qemu-qmp.md §1). Messages name the VM through `label`,
// never the socket path: they reach remote callers.
import net from "node:net";
import { abortedError, Code, type Reason, VfiodError, type VfiodErrorOptions } from "../../errors";

export interface QmpEvent {
  readonly event: string;
  readonly data?: Readonly<Record<string, unknown>>;
  readonly timestamp?: { readonly seconds: number; readonly microseconds: number };
}

export interface QmpGreeting {
  readonly version: { readonly qemu: { readonly major: number; readonly minor: number; readonly micro: number } };
  readonly capabilities: readonly string[];
}

/** QEMU refused a command; `qmpClass` and `desc` are QEMU's own words. */
export class QmpError extends VfiodError {
  readonly qmpClass: string;
  readonly desc: string;

  constructor(label: string, command: string, qmpClass: string, desc: string) {
    super("HYPERVISOR_ERROR", `${label}: ${command}: ${desc}`, { meta: { qmpClass } });
    this.qmpClass = qmpClass;
    this.desc = desc;
  }
}

export interface QmpConnectOptions {
  /** Names the VM in every message, e.g. `qemu VM "web1"`. */
  readonly label: string;
  readonly signal: AbortSignal;
  /**
   * How long to wait for the greeting (default 2000 ms). QEMU accepts a second
   * client but greets it only once the first one leaves (§1): silence means busy.
   */
  readonly greetingTimeoutMs?: number;
}

const DEFAULT_GREETING_TIMEOUT_MS = 2000;

interface Pending {
  readonly command: string;
  settle(err: VfiodError | undefined, value?: unknown): void;
}

export class QmpClient {
  private buffer = "";
  private nextId = 1;
  private announced: QmpGreeting | undefined;
  private socketError: NodeJS.ErrnoException | undefined;
  private failure: VfiodError | undefined;
  private readonly pending = new Map<number, Pending>();
  private readonly listeners = new Set<(event: QmpEvent) => void>();
  /** Waiters other than commands (greeting, events) that must hear of a lost session. */
  private readonly onFailure = new Set<(err: VfiodError) => void>();
  private onGreeting: (() => void) | undefined;

  private constructor(
    private readonly socket: net.Socket,
    readonly label: string,
  ) {
    socket.setEncoding("utf8");
    socket.on("data", (chunk: string) => this.receive(chunk));
    socket.on("error", (err: NodeJS.ErrnoException) => (this.socketError = err));
    socket.on("close", () => this.lostConnection());
  }

  /**
   * Connects, reads the greeting and negotiates capabilities.
   * @throws HYPERVISOR_UNAVAILABLE (UNAVAILABLE) when the socket is missing, refuses,
   *   closes, or the monitor is busy with another client; abortedError on the signal.
   */
  static async connect(socketPath: string, options: QmpConnectOptions): Promise<QmpClient> {
    const { label, signal } = options;
    if (signal.aborted) throw abortedError(signal, `${label}: QMP connect`);
    const client = new QmpClient(net.createConnection(socketPath), label);
    try {
      await client.awaitGreeting(options.greetingTimeoutMs ?? DEFAULT_GREETING_TIMEOUT_MS, signal);
      await client.execute("qmp_capabilities", undefined, signal);
      return client;
    } catch (err) {
      client.close();
      throw err;
    }
  }

  /** The QEMU version and capabilities the monitor announced. */
  get greeting(): QmpGreeting | undefined {
    return this.announced;
  }

  /**
   * Runs one command and resolves with its `return` value. Once the signal has
   * aborted nothing is sent; an abort in flight leaves QEMU running the command.
   * @throws QmpError for an `error` reply, HYPERVISOR_UNAVAILABLE when the
   *   session is lost first, abortedError on the signal.
   */
  execute(command: string, args: Record<string, unknown> | undefined, signal: AbortSignal): Promise<unknown> {
    if (signal.aborted) return Promise.reject(abortedError(signal, `${this.label}: ${command}`));
    if (this.failure !== undefined) return Promise.reject(this.failure);
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      const onAbort = (): void => {
        this.pending.delete(id);
        reject(abortedError(signal, `${this.label}: ${command}`));
      };
      signal.addEventListener("abort", onAbort, { once: true });
      this.pending.set(id, {
        command,
        settle: (err, value) => {
          signal.removeEventListener("abort", onAbort);
          if (err === undefined) resolve(value);
          else reject(err);
        },
      });
      const message = args === undefined ? { execute: command, id } : { execute: command, arguments: args, id };
      this.socket.write(JSON.stringify(message));
    });
  }

  /** Calls `listener` for every event from now on; returns the unsubscribe function. */
  onEvent(listener: (event: QmpEvent) => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  /**
   * Resolves with the first event from now on that `match` accepts. QEMU may send
   * an event before the reply to the command that caused it: call this first.
   * @throws HYPERVISOR_UNAVAILABLE when the session is lost, abortedError on the signal.
   */
  waitEvent(match: (event: QmpEvent) => boolean, signal: AbortSignal, what: string): Promise<QmpEvent> {
    if (signal.aborted) return Promise.reject(abortedError(signal, `${this.label}: ${what}`));
    if (this.failure !== undefined) return Promise.reject(this.failure);
    return new Promise((resolve, reject) => {
      const finish = (): void => {
        unsubscribe();
        this.onFailure.delete(onLost);
        signal.removeEventListener("abort", onAbort);
      };
      const unsubscribe = this.onEvent((event) => {
        if (!match(event)) return;
        finish();
        resolve(event);
      });
      const onLost = (err: VfiodError): void => {
        finish();
        reject(err);
      };
      const onAbort = (): void => onLost(abortedError(signal, `${this.label}: ${what}`));
      this.onFailure.add(onLost);
      signal.addEventListener("abort", onAbort, { once: true });
    });
  }

  /** Closes at once; whatever still waits fails with HYPERVISOR_UNAVAILABLE. */
  close(): void {
    this.fail("HYPERVISOR_UNAVAILABLE", "QMP connection closed");
  }

  private awaitGreeting(timeoutMs: number, signal: AbortSignal): Promise<void> {
    return new Promise((resolve, reject) => {
      const finish = (err?: VfiodError): void => {
        clearTimeout(timer);
        signal.removeEventListener("abort", onAbort);
        this.onFailure.delete(finish);
        this.onGreeting = undefined;
        if (err === undefined) resolve();
        else reject(err);
      };
      const busy = (): void =>
        finish(
          new VfiodError(
            "HYPERVISOR_UNAVAILABLE",
            `${this.label}: QMP monitor busy: no greeting within ${timeoutMs} ms (another client is connected)`,
            { code: Code.UNAVAILABLE },
          ),
        );
      const timer = setTimeout(busy, timeoutMs);
      const onAbort = (): void => finish(abortedError(signal, `${this.label}: QMP greeting`));
      signal.addEventListener("abort", onAbort, { once: true });
      this.onFailure.add(finish);
      this.onGreeting = () => finish();
    });
  }

  private receive(chunk: string): void {
    this.buffer += chunk;
    // QEMU ends every message with "\r\n" and never breaks a line inside one (§1).
    for (let end = this.buffer.indexOf("\n"); end >= 0 && this.failure === undefined; end = this.buffer.indexOf("\n")) {
      const line = this.buffer.slice(0, end).trim();
      this.buffer = this.buffer.slice(end + 1);
      if (line === "") continue;
      let message: unknown;
      try {
        message = JSON.parse(line);
      } catch (cause) {
        this.fail("HYPERVISOR_ERROR", "QMP monitor sent invalid JSON", { code: Code.INTERNAL, cause });
        return;
      }
      if (typeof message === "object" && message !== null) this.dispatch(message as Record<string, unknown>);
    }
  }

  private dispatch(message: Record<string, unknown>): void {
    if ("QMP" in message) {
      this.announced = message.QMP as QmpGreeting;
      this.onGreeting?.();
    } else if (typeof message.event === "string") {
      for (const listener of [...this.listeners]) listener(message as unknown as QmpEvent);
    } else if ("return" in message || "error" in message) {
      // An error found before QEMU read the id comes back without one (§1); replies
      // keep command order, so it answers the oldest command still waiting.
      const id = typeof message.id === "number" ? message.id : this.pending.keys().next().value;
      const pending = id === undefined ? undefined : this.pending.get(id);
      if (id === undefined || pending === undefined) return;
      this.pending.delete(id);
      const error = message.error as { class?: unknown; desc?: unknown } | undefined;
      if (error === undefined) pending.settle(undefined, message.return);
      else pending.settle(new QmpError(this.label, pending.command, String(error.class), String(error.desc)));
    }
  }

  private lostConnection(): void {
    const err = this.socketError;
    // Node's own message names the socket path: keep it in the cause only.
    const why =
      err?.code === "ENOENT"
        ? "QMP socket does not exist (VM not started or gone)"
        : err?.code === "ECONNREFUSED"
          ? "QMP socket refused the connection (QEMU is not running)"
          : err !== undefined
            ? `QMP connection failed (${err.code ?? err.name})`
            : "QMP connection closed by QEMU";
    this.fail("HYPERVISOR_UNAVAILABLE", why, { cause: err });
  }

  /** Ends the session once: every waiter fails with `why`, commands naming themselves. */
  private fail(reason: Reason, why: string, options: VfiodErrorOptions = {}): void {
    if (this.failure !== undefined) return;
    this.failure = new VfiodError(reason, `${this.label}: ${why}`, options);
    this.socket.destroy();
    for (const pending of this.pending.values()) {
      pending.settle(new VfiodError(reason, `${this.label}: ${pending.command}: ${why}`, options));
    }
    this.pending.clear();
    for (const lost of [...this.onFailure]) lost(this.failure);
  }
}
