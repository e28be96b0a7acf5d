// The gRPC surface: vfiod.v1.DeviceService, grpc.health.v1.Health and server
// reflection (v1 and v1alpha), on one grpc-js server.
import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import { ReflectionService } from "@grpc/reflection";
import { toBinary, type DescFile, type MessageInitShape } from "@bufbuild/protobuf";
import { FileDescriptorProtoSchema } from "@bufbuild/protobuf/wkt";
import { HealthImplementation, protoPath as healthProtoPath } from "grpc-health-check";
import { file_google_rpc_error_details } from "../../gen/google/rpc/error_details_pb";
import { file_google_rpc_status } from "../../gen/google/rpc/status_pb";
import { DeviceService, file_vfiod_v1_device, type DeviceSchema } from "../../gen/vfiod/v1/device_pb";
import type { AttachedDevice } from "../backends/backend";
import type { Logger } from "../log";
import type { DeviceOperations } from "../service/device-operations";
import { serviceDefinition, serviceImplementation } from "./adapter";
import { toGrpcStatus } from "./status";

export const DEVICE_SERVICE_NAME = DeviceService.typeName;

function toProtoDevice(device: AttachedDevice): MessageInitShape<typeof DeviceSchema> {
  return { id: device.id, bdf: device.bdf, path: device.path, guestBdf: device.guestBdf };
}

/** Every file a reflection client may ask for, imports included (grpc-node #3034 leaves them out). */
function transitiveFiles(roots: DescFile[]): DescFile[] {
  const seen = new Map<string, DescFile>();
  const visit = (file: DescFile) => {
    if (seen.has(file.name)) return;
    seen.set(file.name, file);
    file.dependencies.forEach(visit);
  };
  roots.forEach(visit);
  return [...seen.values()];
}

function reflectionService(): ReflectionService {
  const files = transitiveFiles([file_vfiod_v1_device, file_google_rpc_status, file_google_rpc_error_details]);
  const encoded = files.map((file) => Buffer.from(toBinary(FileDescriptorProtoSchema, file.proto)));
  const health = protoLoader.loadSync(healthProtoPath);
  // @grpc/reflection reads only `fileDescriptorProtos` of each entry.
  const packageDefinition = {
    [DEVICE_SERVICE_NAME]: { fileDescriptorProtos: encoded },
    ...health,
  } as unknown as protoLoader.PackageDefinition;
  return new ReflectionService(packageDefinition);
}

export interface VfiodServer {
  readonly server: grpc.Server;
  readonly health: HealthImplementation;
  /** Marks every service SERVING (call once listening). */
  markServing(): void;
  /** Marks every service NOT_SERVING (call when draining). */
  markNotServing(): void;
}

export function createVfiodServer(
  operations: DeviceOperations,
  log: Logger,
  serverOptions: grpc.ServerOptions = {},
): VfiodServer {
  const server = new grpc.Server(serverOptions);
  server.addService(
    serviceDefinition(DeviceService),
    serviceImplementation(
      DeviceService,
      {
        attach: async (request, { signal }) => ({
          device: toProtoDevice(await operations.attach(request, signal)),
        }),
        detach: async (request, { signal }) => {
          await operations.detach(request, signal);
          return {};
        },
        list: async (request, { signal }) => ({
          devices: (await operations.list(request, signal)).map(toProtoDevice),
        }),
      },
      (err, method) => toGrpcStatus(err, method, log),
    ),
  );
  const health = new HealthImplementation({ "": "NOT_SERVING", [DEVICE_SERVICE_NAME]: "NOT_SERVING" });
  health.addToServer(server);
  reflectionService().addToServer(server);
  const setAll = (status: "SERVING" | "NOT_SERVING") => {
    health.setStatus("", status);
    health.setStatus(DEVICE_SERVICE_NAME, status);
  };
  return { server, health, markServing: () => setAll("SERVING"), markNotServing: () => setAll("NOT_SERVING") };
}
