// vfiod's own bound on every hypervisor request, for a caller that set no
// deadline (grpcurl's default) or a later one: nothing waits forever on a wedged
// VMM (--hypervisor-timeout). A sent add or remove has its own, longer bound
// (backends/sent-request.ts).
import { abortedError, Code, VfiodError } from "./errors";

/** --hypervisor-timeout's default: a VMM silent this long is wedged, not busy. */
export const DEFAULT_HYPERVISOR_TIMEOUT_MS = 30_000;

/**
 * Runs `fn` with the caller's signal (none for a read shared by several callers,
 * which only vfiod's bound ends), bounded by `ms`.
 * @throws HYPERVISOR_UNAVAILABLE (DEADLINE_EXCEEDED) naming the bound when it, not
 *   the caller, ended the wait; abortedError when the caller had already given up.
 */
export async function withinBound<T>(
  signal: AbortSignal | undefined,
  ms: number,
  what: string,
  fn: (bounded: AbortSignal) => Promise<T>,
): Promise<T> {
  const callerGone = (): boolean => signal?.aborted === true;
  if (signal !== undefined && callerGone()) throw abortedError(signal, what);
  const bound = AbortSignal.timeout(ms);
  try {
    return await fn(signal === undefined ? bound : AbortSignal.any([signal, bound]));
  } catch (err) {
    if (!bound.aborted || callerGone()) throw err;
    throw new VfiodError("HYPERVISOR_UNAVAILABLE", `${what}: no answer within ${ms / 1000} s (vfiod's --hypervisor-timeout)`, {
      code: Code.DEADLINE_EXCEEDED,
      cause: err,
    });
  }
}
