// Who is calling, and may they: the client certificate's CN and DNS SANs under
// mTLS, else the transport peer. Node cannot read a Unix socket's peer uid
// (SO_PEERCRED) without native code, so Unix callers are named by the socket;
// --socket-mode/--socket-group decide who can connect there.
import type * as grpc from "@grpc/grpc-js";
import { VfiodError } from "../errors";

export interface Caller {
  /** For logs and the audit trail: "cn=ctl-1", or the peer address. */
  readonly identity: string;
  /** Certificate CN and DNS SANs; empty without a client certificate. */
  readonly names: readonly string[];
}

type AnyServerCall = Pick<grpc.ServerUnaryCall<unknown, unknown>, "getAuthContext" | "getPeer">;

export function callerOf(call: AnyServerCall): Caller {
  const certificate = call.getAuthContext()?.sslPeerCertificate;
  if (certificate === undefined || certificate.subject === undefined) return { identity: call.getPeer(), names: [] };
  const cn = certificate.subject.CN;
  const commonNames = cn === undefined ? [] : Array.isArray(cn) ? cn : [cn];
  const dnsNames = (certificate.subjectaltname ?? "")
    .split(",")
    .map((entry) => entry.trim())
    .filter((entry) => entry.startsWith("DNS:"))
    .map((entry) => entry.slice(4));
  return { identity: commonNames.length > 0 ? `cn=${commonNames[0]}` : `dns=${dnsNames[0] ?? "?"}`, names: [...commonNames, ...dnsNames] };
}

/** --allow-client: a certificate CN or DNS SAN must be in the list. */
export function authorize(caller: Caller, allowed: ReadonlySet<string> | undefined): void {
  if (allowed === undefined) return;
  if (caller.names.some((name) => allowed.has(name))) return;
  throw new VfiodError(
    "CLIENT_NOT_ALLOWED",
    caller.names.length === 0
      ? "this vfiod only serves clients with an allowed certificate"
      : `client ${caller.identity} is not in vfiod's --allow-client list`,
  );
}
