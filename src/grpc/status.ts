// The only place an error becomes a gRPC status: code, message, and
// grpc-status-details-bin carrying google.rpc.Status with a google.rpc.ErrorInfo
// (domain "vfiod", the stable reason). Anything that is not a VfiodError is a
// bug: the caller sees INTERNAL "internal error" (the call's log line has the cause).
import * as grpc from "@grpc/grpc-js";
import { create, toBinary } from "@bufbuild/protobuf";
import { anyPack } from "@bufbuild/protobuf/wkt";
import { ErrorInfoSchema } from "../../gen/google/rpc/error_details_pb";
import { StatusSchema } from "../../gen/google/rpc/status_pb";
import { VfiodError } from "../errors";

export const ERROR_DOMAIN = "vfiod";
export const STATUS_DETAILS_KEY = "grpc-status-details-bin";

function packStatus(code: number, message: string, reason: string, meta: Record<string, string>): Buffer {
  const info = create(ErrorInfoSchema, { reason, domain: ERROR_DOMAIN, metadata: meta });
  const status = create(StatusSchema, { code, message, details: [anyPack(ErrorInfoSchema, info)] });
  return Buffer.from(toBinary(StatusSchema, status));
}

/** The status a failed call answers with. */
export function toGrpcStatus(err: unknown): Partial<grpc.StatusObject> {
  if (err instanceof VfiodError) {
    const metadata = new grpc.Metadata();
    metadata.set(STATUS_DETAILS_KEY, packStatus(err.code, err.message, err.reason, { ...err.meta }));
    return { code: err.code as number as grpc.status, details: err.message, metadata };
  }
  return { code: grpc.status.INTERNAL, details: "internal error" };
}
