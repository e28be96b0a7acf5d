// The gRPC surface: vfiod.v1.DeviceService, grpc.health.v1.Health and server
// reflection (v1 and v1alpha), on one grpc-js server.
import * as grpc from "@grpc/grpc-js";
import { ReflectionService } from "@grpc/reflection";
import { toBinary, type DescFile, type MessageInitShape } from "@bufbuild/protobuf";
import { FileDescriptorProtoSchema } from "@bufbuild/protobuf/wkt";
import { HealthImplementation } from "grpc-health-check";
import { file_google_rpc_error_details } from "../../gen/google/rpc/error_details_pb";
import { file_google_rpc_status } from "../../gen/google/rpc/status_pb";
import { file_grpc_health_v1_health } from "../../gen/grpc/health/v1/health_pb";
import { DeviceService, file_vfiod_v1_device, type DeviceSchema } from "../../gen/vfiod/v1/device_pb";
import type { AuditLog } from "../audit";
import type { AttachedDevice } from "../backends/backend";
import { Code, VfiodError } from "../errors";
import type { Logger } from "../log";
import type { Metrics } from "../metrics";
import type { DeviceOperations } from "../service/device-operations";
import { serviceDefinition, serviceImplementation, type CallContext } from "./adapter";
import { authorize, callerOf } from "./caller";
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

/**
 * Reflection over protoc-gen-es descriptors: vfiod's own files, and the standard health
 * service's grpc/health/v1/health.proto (generated from grpc-health-check's proto, which
 * @grpc/proto-loader would rebuild into a file reflection clients refuse to load).
 */
function reflectionService(): ReflectionService {
  const files = transitiveFiles([
    file_vfiod_v1_device,
    file_google_rpc_status,
    file_google_rpc_error_details,
    file_grpc_health_v1_health,
  ]);
  const fileDescriptorProtos = files.map((file) => Buffer.from(toBinary(FileDescriptorProtoSchema, file.proto)));
  // @grpc/reflection takes a proto-loader PackageDefinition but reads only `fileDescriptorProtos`
  // of each entry, and indexes every file of every entry by name: one entry carries them all.
  const packageDefinition = { [DEVICE_SERVICE_NAME]: { fileDescriptorProtos } };
  return new ReflectionService(packageDefinition as unknown as ConstructorParameters<typeof ReflectionService>[0]);
}

export interface VfiodServer {
  readonly server: grpc.Server;
  readonly health: HealthImplementation;
  /** Marks every service SERVING (call once listening). */
  markServing(): void;
  /** Marks every service NOT_SERVING (call when draining). */
  markNotServing(): void;
}

export interface VfiodServerOptions {
  /** --allow-client: certificate CNs / DNS SANs allowed to call DeviceService. */
  readonly allowedClients?: ReadonlySet<string>;
  readonly audit?: AuditLog;
  readonly metrics?: Metrics;
}

interface Described {
  readonly vm: string;
  readonly device: string;
  readonly id: string;
}

/** How a finished call is accounted for: metrics always, the audit log for mutations. */
function accounting(log: Logger, options: VfiodServerOptions) {
  return <Req, Res>(
    method: "Attach" | "Detach" | "List",
    describe: (request: Req, response: Res | undefined) => Described,
    handler: (request: Req, context: CallContext) => Promise<Res>,
  ) =>
    async (request: Req, context: CallContext): Promise<Res> => {
      const started = Date.now();
      const caller = callerOf(context.call);
      let response: Res | undefined;
      let outcome = "OK";
      let code = 0;
      try {
        authorize(caller, options.allowedClients);
        response = await handler(request, context);
        return response;
      } catch (err) {
        outcome = err instanceof VfiodError ? err.reason : "INTERNAL";
        code = err instanceof VfiodError ? err.code : Code.INTERNAL;
        throw err;
      } finally {
        const ms = Date.now() - started;
        options.metrics?.observe(method, grpc.status[code] ?? String(code), ms);
        if (method !== "List") {
          const entry = {
            caller: caller.identity,
            method,
            ...describe(request, response),
            outcome,
            code,
            ms,
            // The outcome stands, but the caller left first and saw its deadline or cancel instead.
            ...(context.signal.aborted ? { callerGaveUp: true } : {}),
          };
          try {
            options.audit?.record(entry);
          } catch (err) {
            log.error({ err, entry }, "cannot write the audit log");
          }
        }
      }
    };
}

export function createVfiodServer(operations: DeviceOperations, log: Logger, options: VfiodServerOptions = {}): VfiodServer {
  const server = new grpc.Server();
  const account = accounting(log, options);
  server.addService(
    serviceDefinition(DeviceService),
    serviceImplementation(
      DeviceService,
      {
        attach: account(
          "Attach",
          (request, response) => ({ vm: request.vm, device: request.pci, id: response?.device?.id ?? request.id }),
          async (request, { signal }) => ({ device: toProtoDevice(await operations.attach(request, signal)) }),
        ),
        detach: account(
          "Detach",
          (request) => ({ vm: request.vm, device: "", id: request.id }),
          async (request, { signal }) => {
            await operations.detach(request, signal);
            return {};
          },
        ),
        list: account(
          "List",
          (request) => ({ vm: request.vm, device: "", id: "" }),
          async (request, { signal }) => ({ devices: (await operations.list(request, signal)).map(toProtoDevice) }),
        ),
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
