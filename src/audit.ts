// --audit-log: one JSON line per mutation (Attach, Detach), success or not, saying
// what changed: the resolved VM (id and name, not the reference as typed), the
// canonical BDF attached or removed, the device id, the outcome. Written
// synchronously so a crash right after a mutation cannot lose its line.
import fs from "node:fs";

export interface AuditEntry {
  readonly requestId: string;
  readonly caller: string;
  readonly method: "Attach" | "Detach";
  /** The reference as the caller typed it (may be a prefix or a name). */
  readonly vmRef: string;
  /** The resolved VM's id and name; "" when the call was refused before resolving it. */
  readonly vm: string;
  readonly vmName: string;
  /** Canonical host BDF attached, or removed by a Detach; "" when not known. */
  readonly device: string;
  readonly id: string;
  /** "OK", or the ErrorInfo reason ("INTERNAL" for a bug). */
  readonly outcome: string;
  readonly code: number;
  readonly ms: number;
  /** Set when the caller had gone (deadline or cancel) before the outcome was known. */
  readonly callerGaveUp?: boolean;
}

export class AuditLog {
  private constructor(private readonly fd: number) {}

  /** `-` means stderr. */
  static open(target: string): AuditLog {
    return new AuditLog(target === "-" ? 2 : fs.openSync(target, "a", 0o600));
  }

  record(entry: AuditEntry): void {
    fs.writeSync(this.fd, `${JSON.stringify({ time: new Date().toISOString(), ...entry })}\n`);
  }
}
