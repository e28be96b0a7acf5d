// Shared pieces of the fuzz, race and soak suites (test/fuzz, test/races): a
// bounded-concurrency runner, the contract's (code, reason) pairs, tallies, a
// direct vm.info read of a Cloud Hypervisor double, and timing of the mutating
// requests a double serves.
import * as grpc from "@grpc/grpc-js";
import http from "node:http";
import { setTimeout as sleep } from "node:timers/promises";
import { errorInfo } from "../../src/grpc/client";
import type { ChDouble, ChRequest } from "./ch-double";

export interface PoolOptions<T> {
  /**
   * A call still unanswered after this long fails the whole run, naming its
   * input: a hang is found without giving every call a gRPC deadline (whose
   * per-call timers cost a quarter of the throughput of a 100k-call fuzz).
   */
  hangMs?: number;
  describe?: (item: T) => string;
}

/** Runs `fn` over `items` with at most `limit` calls in flight. */
export async function runPool<T>(
  items: readonly T[],
  limit: number,
  fn: (item: T, index: number) => Promise<void>,
  options: PoolOptions<T> = {},
): Promise<void> {
  let next = 0;
  const started = new Map<number, number>();
  const worker = async () => {
    while (next < items.length) {
      const index = next++;
      started.set(index, performance.now());
      await fn(items[index] as T, index);
      started.delete(index);
    }
  };
  const all = Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
  const { hangMs } = options;
  if (hangMs === undefined) {
    await all;
    return;
  }
  let timer: NodeJS.Timeout | undefined;
  const hang = new Promise<never>((_resolve, reject) => {
    timer = setInterval(() => {
      const now = performance.now();
      for (const [index, at] of started) {
        if (now - at > hangMs) {
          const item = items[index] as T;
          const what = options.describe?.(item) ?? JSON.stringify(item)?.slice(0, 200);
          reject(new Error(`no answer within ${hangMs} ms to input #${index}: ${what}`));
        }
      }
    }, 500);
  });
  try {
    await Promise.race([all, hang]);
  } finally {
    clearInterval(timer);
  }
}

/**
 * Runs `fn` with Error.stackTraceLimit at 0. Every refused call builds errors on
 * both ends (vfiod's VfiodError, grpc-js's client error) whose stacks jest maps
 * through source maps: half the CPU of a bulk fuzz. vfiod never looks at stacks.
 */
export async function withoutStackTraces<T>(fn: () => Promise<T>): Promise<T> {
  const limit = Error.stackTraceLimit;
  Error.stackTraceLimit = 0;
  try {
    return await fn();
  } finally {
    Error.stackTraceLimit = limit;
  }
}

/** Every (gRPC code, ErrorInfo reason) pair ../shared/contract.md allows, plus CANCELLED for a caller that went away. */
export const CONTRACT_STATUSES: ReadonlySet<string> = new Set([
  "INVALID_ARGUMENT/INVALID_ARGUMENT",
  "NOT_FOUND/VM_NOT_FOUND",
  "FAILED_PRECONDITION/VM_AMBIGUOUS",
  "FAILED_PRECONDITION/VM_NOT_RUNNING",
  "FAILED_PRECONDITION/VM_PAUSED",
  "UNIMPLEMENTED/BACKEND_UNSUPPORTED",
  "NOT_FOUND/DEVICE_NOT_FOUND",
  "FAILED_PRECONDITION/DEVICE_NOT_VFIO",
  "FAILED_PRECONDITION/IOMMU_GROUP_NOT_VIABLE",
  "FAILED_PRECONDITION/DEVICE_IN_USE",
  "ALREADY_EXISTS/ID_IN_USE",
  "ALREADY_EXISTS/DEVICE_ALREADY_ATTACHED",
  "NOT_FOUND/DEVICE_NOT_ATTACHED",
  "UNAVAILABLE/HYPERVISOR_UNAVAILABLE",
  "DEADLINE_EXCEEDED/HYPERVISOR_UNAVAILABLE",
  "CANCELLED/HYPERVISOR_UNAVAILABLE",
  "RESOURCE_EXHAUSTED/NO_FREE_SLOT",
  "DEADLINE_EXCEEDED/DETACH_PENDING",
  "PERMISSION_DENIED/DEVICE_NOT_ALLOWED",
  "PERMISSION_DENIED/CLIENT_NOT_ALLOWED",
  "ABORTED/VM_BUSY",
  "FAILED_PRECONDITION/HYPERVISOR_ERROR",
  "INTERNAL/HYPERVISOR_ERROR",
  // Managed binding (AttachRequest.managed): random bytes can set it.
  "FAILED_PRECONDITION/BINDING_DISABLED",
  "FAILED_PRECONDITION/DEVICE_BUSY_ON_HOST",
]);

/** What a finished call came to: "OK", or "<CODE>/<reason>" ("<CODE>/-" without an ErrorInfo). */
export interface Outcome {
  readonly key: string;
  readonly code: number;
  readonly reason: string | undefined;
  readonly message: string;
}

export function codeName(code: number): string {
  return grpc.status[code] ?? `code ${code}`;
}

export const OK: Outcome = { key: "OK", code: grpc.status.OK, reason: undefined, message: "" };

/** The outcome of a settled call; rethrows what is not a gRPC error (a bug in the test). */
export async function outcomeOf<T>(call: Promise<T>): Promise<{ outcome: Outcome; response?: T }> {
  try {
    return { outcome: OK, response: await call };
  } catch (err) {
    if (!(err instanceof Error) || typeof (err as grpc.ServiceError).code !== "number") throw err;
    const e = err as grpc.ServiceError;
    const info = errorInfo(err);
    const reason = info?.reason;
    return { outcome: { key: `${codeName(e.code)}/${reason ?? "-"}`, code: e.code, reason, message: e.details } };
  }
}

/** Whether a refusal is one the contract knows, carried in a vfiod ErrorInfo. */
export function isContractRefusal(outcome: Outcome): boolean {
  return outcome.reason !== undefined && CONTRACT_STATUSES.has(outcome.key);
}

/** Counts by key, printed sorted by count. */
export class Tally {
  private readonly counts = new Map<string, number>();

  add(key: string, n = 1): void {
    this.counts.set(key, (this.counts.get(key) ?? 0) + n);
  }

  get(key: string): number {
    return this.counts.get(key) ?? 0;
  }

  total(): number {
    return [...this.counts.values()].reduce((a, b) => a + b, 0);
  }

  entries(): [string, number][] {
    return [...this.counts].sort((a, b) => b[1] - a[1] || a[0].localeCompare(b[0]));
  }

  toString(): string {
    return this.entries()
      .map(([key, n]) => `${key}=${n}`)
      .join(", ");
  }
}

/** The parts of a double's vm.info the suites compare with vfiod's List. */
export interface RawVmInfo {
  state: string;
  config: { devices?: { id?: string; path?: string }[] | null };
  device_tree?: Record<string, unknown> | null;
}

/** GET /api/v1/vm.info straight from a double's socket, not through vfiod. */
export function rawVmInfo(socketPath: string): Promise<RawVmInfo> {
  return new Promise((resolve, reject) => {
    const req = http.request(
      { socketPath, path: "/api/v1/vm.info", method: "GET", agent: false, timeout: 10_000 },
      (res) => {
        let body = "";
        res.setEncoding("utf8");
        res.on("data", (chunk: string) => (body += chunk));
        res.on("end", () => {
          if (res.statusCode !== 200) reject(new Error(`vm.info answered ${res.statusCode}: ${body}`));
          else resolve(JSON.parse(body) as RawVmInfo);
        });
      },
    );
    req.on("timeout", () => req.destroy(new Error("vm.info timed out")));
    req.on("error", reject);
    req.end();
  });
}

/** Polls `condition` every 10 ms until it holds; throws after `timeoutMs`. */

export const MUTATING_ENDPOINTS: ReadonlySet<string> = new Set(["vm.add-device", "vm.remove-device"]);

/** A mutating request that arrived while an earlier one was still unanswered. */
export interface Overlap {
  readonly arrived: string;
  readonly unanswered: string[];
}

/**
 * Watches a double for two mutating requests in flight at once: one arriving
 * before the reply to an earlier one was written. vfiod holds the VM's lock from
 * its vm.info check to the reply of its add/remove, so with the per-VM lock
 * working this never happens.
 *
 * The double has no timing hooks: arrival is seen by wrapping the push onto its
 * public request log, the reply by wrapping its private per-request `answer`
 * job (it runs the jobs one at a time, in arrival order). Throws when the
 * double's shape changed so the watch would silently see nothing.
 */
export function watchMutationOverlap(
  double: ChDouble,
  options: { mutationDelayMs?: number } = {},
): { overlaps: Overlap[]; mutations: () => number } {
  const overlaps: Overlap[] = [];
  const open: string[] = [];
  let count = 0;
  const describe = (r: ChRequest) => `${r.endpoint} ${JSON.stringify(r.body)}`;
  const log = double.requests;
  const push = log.push.bind(log);
  log.push = (...items: ChRequest[]): number => {
    for (const item of items) {
      if (MUTATING_ENDPOINTS.has(item.endpoint)) {
        count += 1;
        if (open.length > 0) overlaps.push({ arrived: describe(item), unanswered: [...open] });
        open.push(describe(item));
      }
    }
    return push(...items);
  };
  type Answer = (socket: unknown, request: { target: string }, fault: unknown) => Promise<void>;
  const internals = double as unknown as { answer?: Answer };
  const answer = internals.answer;
  if (typeof answer !== "function") {
    throw new Error("ChDouble has no answer() to time replies with; update watchMutationOverlap");
  }
  internals.answer = async (socket, request, fault) => {
    const endpoint = request.target.replace(/^\/api\/v1\//, "").split("?")[0] ?? "";
    try {
      // A slow add/remove (a VFIO DMA map) widens the window a missing lock would show in.
      if (MUTATING_ENDPOINTS.has(endpoint) && options.mutationDelayMs) await sleep(options.mutationDelayMs);
      await answer.call(double, socket, request, fault);
    } finally {
      if (MUTATING_ENDPOINTS.has(endpoint)) open.shift();
    }
  };
  return { overlaps, mutations: () => count };
}
