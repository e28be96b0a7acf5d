// One call as the service layer sees it, whatever the transport: the caller's
// signal, a logger carrying the call's request id, and what the call turned out
// to be about once resolved (for the log and the audit line).
import type { Logger } from "../log";

/** The most a lock wait gives back of the caller's time, for the answer to reach it. */
const ANSWER_MARGIN_MS = 200;

/**
 * A signal that aborts with `signal`, or `margin` before `deadline` (ms since
 * epoch; undefined: none): a fifth of the time left, at most ANSWER_MARGIN_MS.
 */
export function waitSignalFor(signal: AbortSignal, deadline: number | undefined): AbortSignal {
  if (deadline === undefined) return signal;
  const left = deadline - Date.now();
  const margin = Math.min(ANSWER_MARGIN_MS, left / 5);
  return AbortSignal.any([signal, AbortSignal.timeout(Math.max(0, Math.floor(left - margin)))]);
}

/** What a call was about, filled in as the service resolves it. */
export interface CallFacts {
  /** The VM's id and name once resolved (the reference as typed may be a prefix). */
  vm?: string;
  vmName?: string;
  /** Canonical host BDF: the one attached, or the one a Detach removed. */
  device?: string;
  /** Device id, once known (the hypervisor may choose it). */
  id?: string;
}

export interface Call {
  /** Aborts when the caller's deadline passes (TimeoutError) or it cancels (AbortError). */
  readonly signal: AbortSignal;
  /**
   * For waiting on a lock: aborts a little before the caller's deadline, so the
   * caller hears VM_BUSY from vfiod rather than its own DEADLINE_EXCEEDED.
   */
  readonly waitSignal: AbortSignal;
  /** vfiod's logger with this call's request id on every line. */
  readonly log: Logger;
  readonly facts: CallFacts;
}
