// The one error vocabulary of vfiod. Every layer throws VfiodError with a stable
// reason; src/grpc/status.ts is the only place that turns it into a gRPC status.

/** gRPC status codes by number (grpc/doc/statuscodes.md); vfiod adds none of its own. */
export enum Code {
  OK = 0,
  /** The caller cancelled the call. */
  CANCELLED = 1,
  /** The request itself is malformed, whatever the state of the host or VM. */
  INVALID_ARGUMENT = 3,
  /** The call's deadline passed, or a wait inside it ran out. */
  DEADLINE_EXCEEDED = 4,
  /** The VM, device or device id named does not exist. */
  NOT_FOUND = 5,
  /** The id or device is already attached in a way that conflicts. */
  ALREADY_EXISTS = 6,
  /** The caller is not allowed to do this. */
  PERMISSION_DENIED = 7,
  /** No capacity left (hot-plug slots). */
  RESOURCE_EXHAUSTED = 8,
  /** The request is valid but the host or VM is not in a state to serve it. */
  FAILED_PRECONDITION = 9,
  /** Lost a race with another operation; retrying may work. */
  ABORTED = 10,
  /** The backend cannot do this at all. */
  UNIMPLEMENTED = 12,
  /** A bug, or a hypervisor that failed in a way vfiod cannot explain. */
  INTERNAL = 13,
  /** The hypervisor could not be reached; retrying may work. */
  UNAVAILABLE = 14,
}

/** Stable reasons (google.rpc.ErrorInfo.reason, domain "vfiod"); see ../shared/contract.md. */
export type Reason =
  | "INVALID_ARGUMENT"
  | "VM_NOT_FOUND"
  | "VM_AMBIGUOUS"
  | "VM_NOT_RUNNING"
  | "VM_PAUSED"
  | "BACKEND_UNSUPPORTED"
  | "DEVICE_NOT_FOUND"
  | "DEVICE_NOT_VFIO"
  | "IOMMU_GROUP_NOT_VIABLE"
  | "DEVICE_IN_USE"
  | "ID_IN_USE"
  | "DEVICE_ALREADY_ATTACHED"
  | "DEVICE_NOT_ATTACHED"
  | "HYPERVISOR_UNAVAILABLE"
  | "NO_FREE_SLOT"
  | "DETACH_PENDING"
  | "DEVICE_NOT_ALLOWED"
  | "CLIENT_NOT_ALLOWED"
  | "VM_BUSY"
  | "HYPERVISOR_ERROR"
  | "WATCHER_BEHIND"
  | "SHUTTING_DOWN"
  // Managed binding (AttachRequest.managed): asked for without --manage-binding;
  // the host is using the device (mounted, swap, holder, interface up, boot VGA, open).
  | "BINDING_DISABLED"
  | "DEVICE_BUSY_ON_HOST";

/** The code a reason gets unless the thrower says otherwise (HYPERVISOR_* have two). */
const DEFAULT_CODE: Record<Reason, Code> = {
  INVALID_ARGUMENT: Code.INVALID_ARGUMENT,
  VM_NOT_FOUND: Code.NOT_FOUND,
  VM_AMBIGUOUS: Code.FAILED_PRECONDITION,
  VM_NOT_RUNNING: Code.FAILED_PRECONDITION,
  VM_PAUSED: Code.FAILED_PRECONDITION,
  BACKEND_UNSUPPORTED: Code.UNIMPLEMENTED,
  DEVICE_NOT_FOUND: Code.NOT_FOUND,
  DEVICE_NOT_VFIO: Code.FAILED_PRECONDITION,
  IOMMU_GROUP_NOT_VIABLE: Code.FAILED_PRECONDITION,
  DEVICE_IN_USE: Code.FAILED_PRECONDITION,
  ID_IN_USE: Code.ALREADY_EXISTS,
  DEVICE_ALREADY_ATTACHED: Code.ALREADY_EXISTS,
  DEVICE_NOT_ATTACHED: Code.NOT_FOUND,
  HYPERVISOR_UNAVAILABLE: Code.UNAVAILABLE,
  NO_FREE_SLOT: Code.RESOURCE_EXHAUSTED,
  DETACH_PENDING: Code.DEADLINE_EXCEEDED,
  DEVICE_NOT_ALLOWED: Code.PERMISSION_DENIED,
  CLIENT_NOT_ALLOWED: Code.PERMISSION_DENIED,
  VM_BUSY: Code.ABORTED,
  HYPERVISOR_ERROR: Code.FAILED_PRECONDITION,
  WATCHER_BEHIND: Code.RESOURCE_EXHAUSTED,
  SHUTTING_DOWN: Code.UNAVAILABLE,
  BINDING_DISABLED: Code.FAILED_PRECONDITION,
  DEVICE_BUSY_ON_HOST: Code.FAILED_PRECONDITION,
};

export interface VfiodErrorOptions {
  /** Overrides the reason's default code (HYPERVISOR_ERROR is INTERNAL for 5xx). */
  code?: Code;
  /** Machine-readable facts for ErrorInfo.metadata (vm, device, id, ...). */
  meta?: Record<string, string>;
  /** Underlying error: logged, never sent to the caller. */
  cause?: unknown;
}

/** An error the caller is meant to see: its message is safe to send. */
export class VfiodError extends Error {
  readonly reason: Reason;
  readonly code: Code;
  readonly meta: Readonly<Record<string, string>>;

  constructor(reason: Reason, message: string, options: VfiodErrorOptions = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = "VfiodError";
    this.reason = reason;
    this.code = options.code ?? DEFAULT_CODE[reason];
    this.meta = options.meta ?? {};
  }
}

export function isVfiodError(err: unknown, reason?: Reason): err is VfiodError {
  return err instanceof VfiodError && (reason === undefined || err.reason === reason);
}

/** A failed file operation's errno code ("ENOENT"), or "unknown error". */
export function errnoOf(err: unknown): string {
  return (err as NodeJS.ErrnoException).code ?? "unknown error";
}

/**
 * Turns the abort of a caller's signal into the error the caller should see:
 * DEADLINE_EXCEEDED when its deadline passed, CANCELLED when it went away.
 * `what` says what was being waited for ("cloud-hypervisor vm.info").
 */
export function abortedError(signal: AbortSignal, what: string): VfiodError {
  const timedOut = signal.reason instanceof DOMException && signal.reason.name === "TimeoutError";
  return timedOut
    ? new VfiodError("HYPERVISOR_UNAVAILABLE", `${what}: deadline exceeded`, {
        code: Code.DEADLINE_EXCEEDED,
        cause: signal.reason,
      })
    : new VfiodError("HYPERVISOR_UNAVAILABLE", `${what}: call cancelled`, {
        code: Code.CANCELLED,
        cause: signal.reason,
      });
}
