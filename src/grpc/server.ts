// The gRPC surface: vfiod.v1.DeviceService, grpc.health.v1.Health and server
// reflection (v1 and v1alpha), on one grpc-js server.
import * as grpc from "@grpc/grpc-js";
import { ReflectionService } from "@grpc/reflection";
import { toBinary, type DescFile, type MessageInitShape } from "@bufbuild/protobuf";
import { FileDescriptorProtoSchema, timestampFromDate } from "@bufbuild/protobuf/wkt";
import { HealthImplementation } from "grpc-health-check";
import { file_google_rpc_error_details } from "../../gen/google/rpc/error_details_pb";
import { file_google_rpc_status } from "../../gen/google/rpc/status_pb";
import { file_grpc_health_v1_health } from "../../gen/grpc/health/v1/health_pb";
import {
  DeviceService,
  file_vfiod_v1_device,
  WatchEvent_Kind,
  type DeviceSchema,
  type WatchEventSchema,
} from "../../gen/vfiod/v1/device_pb";
import { file_vfiod_v1_inventory, InventoryService } from "../../gen/vfiod/v1/inventory_pb";
import { randomUUID } from "node:crypto";
import type { AuditEntry, AuditLog } from "../audit";
import type { AttachedDevice } from "../backends/backend";
import { Code, VfiodError } from "../errors";
import type { Logger } from "../log";
import type { Metrics } from "../metrics";
import { waitSignalFor, type Call } from "../service/call";
import type { DeviceOperations } from "../service/device-operations";
import type { DeviceWatch, WatchedEvent, WatchKind } from "../service/device-watch";
import type { InventoryQueries } from "../service/inventory-queries";
import { serviceDefinition, serviceImplementation, type CallContext, type StreamSink } from "./adapter";
import { authorize, callerOf } from "./caller";
import { toGrpcStatus } from "./status";

export const DEVICE_SERVICE_NAME = DeviceService.typeName;
export const INVENTORY_SERVICE_NAME = InventoryService.typeName;

function toProtoDevice(device: AttachedDevice): MessageInitShape<typeof DeviceSchema> {
  return { id: device.id, bdf: device.bdf, path: device.path, guestBdf: device.guestBdf };
}

const WATCH_KINDS: Record<WatchKind, WatchEvent_Kind> = {
  present: WatchEvent_Kind.PRESENT,
  synced: WatchEvent_Kind.SYNCED,
  attached: WatchEvent_Kind.ATTACHED,
  detach_requested: WatchEvent_Kind.DETACH_REQUESTED,
  detach_pending: WatchEvent_Kind.DETACH_PENDING,
  detached: WatchEvent_Kind.DETACHED,
  driver_bound: WatchEvent_Kind.DRIVER_BOUND,
  driver_restored: WatchEvent_Kind.DRIVER_RESTORED,
};

function toProtoEvent(event: WatchedEvent): MessageInitShape<typeof WatchEventSchema> {
  return {
    kind: WATCH_KINDS[event.kind],
    vm: event.vm,
    device: event.device === undefined ? undefined : toProtoDevice(event.device),
    time: timestampFromDate(event.time),
    detail: event.detail,
  };
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
    file_vfiod_v1_inventory,
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

/** The caller's request id header, echoed in the response metadata and on every log line of the call. */
export const REQUEST_ID_KEY = "x-request-id";
/** A request id vfiod takes as given: printable, no spaces, short (else it makes one). */
const REQUEST_ID = /^[\x21-\x7e]{1,128}$/;

function requestIdOf(metadata: grpc.Metadata): string {
  const [given] = metadata.get(REQUEST_ID_KEY);
  return typeof given === "string" && REQUEST_ID.test(given) ? given : randomUUID();
}

type Method = "Attach" | "Detach" | "List" | "Watch" | "ListVms" | "ListHostDevices";

/** Attach and Detach change a VM: logged at info when they succeed, and audited. */
function isMutation(method: Method): method is AuditEntry["method"] {
  return method === "Attach" || method === "Detach";
}

/**
 * Runs one call: its request id (taken or made, and sent back in the initial
 * metadata and the trailers), the caller's authorization, one log line at its end
 * (an expected refusal at info with its reason, a bug with its stack), its
 * metrics, and for a mutation its audit line.
 */
function callRunner(log: Logger, options: VfiodServerOptions) {
  return <Req extends object, Res, Extra extends unknown[]>(
      method: Method,
      handler: (request: Req, call: Call, ...extra: Extra) => Promise<Res>,
    ) =>
    async (request: Req, context: CallContext, ...extra: Extra): Promise<Res> => {
      // The VM reference as typed, for calls about one VM.
      const vmRef = "vm" in request && typeof request.vm === "string" ? request.vm : undefined;
      const started = Date.now();
      const requestId = requestIdOf(context.call.metadata);
      const echoed = new grpc.Metadata();
      echoed.set(REQUEST_ID_KEY, requestId);
      context.call.sendMetadata(echoed);
      context.trailers.set(REQUEST_ID_KEY, requestId);
      const caller = callerOf(context.call);
      let callLog: Logger | undefined;
      const call: Call = {
        signal: context.signal,
        waitSignal: waitSignalFor(context.signal, context.deadline),
        // Made when first used: most calls log only their one closing line.
        get log() {
          return (callLog ??= log.child({ requestId }));
        },
        facts: {},
      };
      let outcome = "OK";
      let code: number = Code.OK;
      let failure: unknown;
      try {
        authorize(caller, options.allowedClients);
        return await handler(request, call, ...extra);
      } catch (err) {
        failure = err;
        outcome = err instanceof VfiodError ? err.reason : "INTERNAL";
        code = err instanceof VfiodError ? err.code : Code.INTERNAL;
        throw err;
      } finally {
        const ms = Date.now() - started;
        options.metrics?.observe(method, grpc.status[code] ?? String(code), ms);
        const { facts } = call;
        // The outcome stands, but the caller left first and saw its deadline or cancel instead.
        const gaveUp = context.signal.aborted ? { callerGaveUp: true } : {};
        const fields = { requestId, method, caller: caller.identity, ...(vmRef === undefined ? {} : { vmRef }), ...facts, ms, ...gaveUp };
        if (failure === undefined) {
          if (isMutation(method)) log.info(fields, `${method} done`);
          else log.debug(fields, `${method} done`);
        } else if (failure instanceof VfiodError) {
          const level = failure.code === Code.INTERNAL || failure.code === Code.UNAVAILABLE ? "warn" : "info";
          log[level]({ ...fields, reason: failure.reason, code: grpc.status[code], message: failure.message }, `${method} refused`);
        } else {
          log.error({ ...fields, err: failure }, `${method} failed: internal error`);
        }
        if (isMutation(method)) {
          const entry: AuditEntry = {
            requestId,
            caller: caller.identity,
            method,
            vmRef: vmRef ?? "",
            vm: facts.vm ?? "",
            vmName: facts.vmName ?? "",
            device: facts.device ?? "",
            id: facts.id ?? "",
            outcome,
            code,
            ms,
            ...gaveUp,
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

export function createVfiodServer(
  operations: DeviceOperations,
  watch: DeviceWatch,
  queries: InventoryQueries,
  log: Logger,
  options: VfiodServerOptions = {},
): VfiodServer {
  const server = new grpc.Server();
  const run = callRunner(log, options);
  server.addService(
    serviceDefinition(DeviceService),
    serviceImplementation(
      DeviceService,
      {
        attach: run("Attach", async (request, call) => {
          const { device, companions } = await operations.attach(request, call);
          return { device: toProtoDevice(device), companions: companions.map(toProtoDevice) };
        }),
        detach: run("Detach", async (request, call) => {
          await operations.detach(request, call);
          return {};
        }),
        list: run("List", async (request, call) => ({ devices: (await operations.list(request, call)).map(toProtoDevice) })),
        watch: run("Watch", (request, call, sink: StreamSink<typeof DeviceService.method.watch>) =>
          watch.watch(request, call, {
            write: (event) => sink.write(toProtoEvent(event)),
            drained: () => sink.drained(),
          }),
        ),
      },
      toGrpcStatus,
    ),
  );
  server.addService(
    serviceDefinition(InventoryService),
    serviceImplementation(
      InventoryService,
      {
        listVms: run("ListVms", async (_request, call) => ({ vms: await queries.listVms(call) })),
        listHostDevices: run("ListHostDevices", async (request, call) => ({ devices: await queries.listHostDevices(request, call) })),
      },
      toGrpcStatus,
    ),
  );
  const health = new HealthImplementation({
    "": "NOT_SERVING",
    [DEVICE_SERVICE_NAME]: "NOT_SERVING",
    [INVENTORY_SERVICE_NAME]: "NOT_SERVING",
  });
  health.addToServer(server);
  reflectionService().addToServer(server);
  const setAll = (status: "SERVING" | "NOT_SERVING") => {
    for (const service of ["", DEVICE_SERVICE_NAME, INVENTORY_SERVICE_NAME]) health.setStatus(service, status);
  };
  return { server, health, markServing: () => setAll("SERVING"), markNotServing: () => setAll("NOT_SERVING") };
}
