// A mutating request (add or remove a device) must not be abandoned once sent:
// the hypervisor acts on it whatever the caller does, and vfiod has to know the
// outcome before the VM's lock is released. So the caller's signal decides only
// whether the request is sent at all; after that its reply is awaited, bounded
// by vfiod's own limit (a first VFIO add maps all guest RAM and can be slow).
import { abortedError } from "../errors";

/** How long a sent add/remove request is awaited, whatever the caller's deadline. */
export const SENT_REQUEST_LIMIT_MS = 120_000;

/**
 * The signal to send a mutating request with.
 * @throws the caller's abort (CANCELLED / DEADLINE_EXCEEDED) when it came first: nothing is sent.
 */
export function sentRequestSignal(callerSignal: AbortSignal, what: string): AbortSignal {
  if (callerSignal.aborted) throw abortedError(callerSignal, what);
  return AbortSignal.timeout(SENT_REQUEST_LIMIT_MS);
}
