// One call as the service layer sees it, whatever the transport: the caller's
// signal, a logger carrying the call's request id, and what the call turned out
// to be about once resolved (for the log and the audit line).
import type { Logger } from "../log";

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
  /** vfiod's logger with this call's request id on every line. */
  readonly log: Logger;
  readonly facts: CallFacts;
}
