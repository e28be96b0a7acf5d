// Typed DeviceService, InventoryService and grpc.health.v1.Health clients for tests, the CLI
// and other Node callers.
import * as grpc from "@grpc/grpc-js";
import { fromBinary } from "@bufbuild/protobuf";
import { anyUnpack } from "@bufbuild/protobuf/wkt";
import { ErrorInfoSchema, type ErrorInfo } from "../../gen/google/rpc/error_details_pb";
import { StatusSchema } from "../../gen/google/rpc/status_pb";
import { Health } from "../../gen/grpc/health/v1/health_pb";
import { DeviceService } from "../../gen/vfiod/v1/device_pb";
import { InventoryService } from "../../gen/vfiod/v1/inventory_pb";
import { createClient, type ServiceClient } from "./adapter";
import { ERROR_DOMAIN, STATUS_DETAILS_KEY } from "./status";

export type DeviceClient = ServiceClient<typeof DeviceService>;
export type InventoryClient = ServiceClient<typeof InventoryService>;
/** grpc.health.v1.Health: Check and List as promises, Watch as a stream. */
export type HealthClient = ServiceClient<typeof Health>;

export function createDeviceClient(
  target: string,
  credentials?: grpc.ChannelCredentials,
  channelOptions?: grpc.ChannelOptions,
): DeviceClient {
  return createClient(DeviceService, target, credentials, channelOptions);
}

export function createInventoryClient(
  target: string,
  credentials?: grpc.ChannelCredentials,
  channelOptions?: grpc.ChannelOptions,
): InventoryClient {
  return createClient(InventoryService, target, credentials, channelOptions);
}

export function createHealthClient(
  target: string,
  credentials?: grpc.ChannelCredentials,
  channelOptions?: grpc.ChannelOptions,
): HealthClient {
  return createClient(Health, target, credentials, channelOptions);
}

/** The vfiod ErrorInfo of a failed call, when the server sent one. */
export function errorInfo(err: unknown): ErrorInfo | undefined {
  if (!(err instanceof Error) || !("metadata" in err) || !(err.metadata instanceof grpc.Metadata)) return undefined;
  const [bytes] = err.metadata.get(STATUS_DETAILS_KEY);
  if (!Buffer.isBuffer(bytes)) return undefined;
  const status = fromBinary(StatusSchema, bytes);
  for (const detail of status.details) {
    const info = anyUnpack(detail, ErrorInfoSchema);
    if (info !== undefined && info.domain === ERROR_DOMAIN) return info;
  }
  return undefined;
}

/** google.rpc.ErrorInfo.reason of a failed call (what a control plane branches on). */
export function errorReason(err: unknown): string | undefined {
  return errorInfo(err)?.reason;
}
