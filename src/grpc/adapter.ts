// Maps protoc-gen-es service descriptors onto @grpc/grpc-js, in both directions:
// a server-side service definition plus typed handlers, and a typed client.
// protoc-gen-es v2 emits descriptors, not grpc-js stubs; this is the one place
// that bridges them (walks DescService.methods, keys by /package.Service/Method).
import * as grpc from "@grpc/grpc-js";
import { setMaxListeners } from "node:events";
import {
  create,
  fromBinary,
  toBinary,
  type DescMessage,
  type DescMethod,
  type DescService,
  type Message,
  type MessageInitShape,
  type MessageShape,
} from "@bufbuild/protobuf";

type Methods<S extends DescService> = S["method"];
type InputOf<M> = M extends { input: infer I extends DescMessage } ? I : never;
type OutputOf<M> = M extends { output: infer O extends DescMessage } ? O : never;

/** What a handler gets besides the request. */
export interface CallContext {
  /** Aborts when the caller's deadline passes (reason: TimeoutError) or the caller cancels. */
  readonly signal: AbortSignal;
  readonly call: grpc.ServerUnaryCall<Message, Message>;
  /** Sent with the call's status, whether it succeeds or fails. */
  readonly trailers: grpc.Metadata;
  /** The caller's deadline (ms since epoch), when it gave one. */
  readonly deadline: number | undefined;
}

export type UnaryHandler<M> = (
  request: MessageShape<InputOf<M>>,
  context: CallContext,
) => Promise<MessageInitShape<OutputOf<M>>>;

export type ServiceHandlers<S extends DescService> = { [K in keyof Methods<S>]: UnaryHandler<Methods<S>[K]> };

/** Turns whatever a handler threw into the status the caller gets. */
export type ErrorToStatus = (err: unknown) => Partial<grpc.StatusObject>;

/** Every method of a service, which must all be unary: a server or client of it would silently lack the others. */
function unaryMethods(service: DescService): DescMethod[] {
  for (const method of service.methods) {
    if (method.methodKind !== "unary") {
      throw new Error(`${service.typeName}.${method.name}: only unary methods are supported, not ${method.methodKind}`);
    }
  }
  return service.methods;
}

function methodPath(method: DescMethod): string {
  return `/${method.parent.typeName}/${method.name}`;
}

function serializer(desc: DescMessage) {
  // grpc-js writes what the serializer returns as-is and needs a Buffer.
  return (message: Message): Buffer => {
    const bytes = toBinary(desc, message);
    return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  };
}

function deserializer(desc: DescMessage) {
  return (bytes: Buffer): Message => fromBinary(desc, bytes);
}

/** The grpc-js definition of a protoc-gen-es service (unary methods only). */
export function serviceDefinition(service: DescService): grpc.ServiceDefinition {
  const definition: Record<string, grpc.MethodDefinition<Message, Message>> = {};
  for (const method of unaryMethods(service)) {
    definition[method.name] = {
      path: methodPath(method),
      requestStream: false,
      responseStream: false,
      requestSerialize: serializer(method.input),
      requestDeserialize: deserializer(method.input),
      responseSerialize: serializer(method.output),
      responseDeserialize: deserializer(method.output),
      originalName: method.localName,
    };
  }
  return definition;
}

/**
 * A client cancels its call when its own deadline passes, and that cancel can
 * reach the server a little before the server's copy of the deadline (it is
 * sent relative, so it ends later by the transit time). A cancel this close to
 * the deadline is the deadline.
 */
const DEADLINE_SKEW_MS = 100;

/** The caller's deadline in ms since epoch, or undefined when it set none. */
function deadlineOf(call: grpc.ServerUnaryCall<Message, Message>): number | undefined {
  const deadline = call.getDeadline();
  const at = deadline instanceof Date ? deadline.getTime() : deadline;
  return Number.isFinite(at) ? at : undefined;
}

/** An AbortSignal that follows the call's deadline (reason TimeoutError) and its cancellation (AbortError). */
export function callSignal(call: grpc.ServerUnaryCall<Message, Message>): AbortSignal {
  const at = deadlineOf(call) ?? Infinity;
  const cancelled = new AbortController();
  call.once("cancelled", () => {
    const atDeadline = Number.isFinite(at) && at - Date.now() <= DEADLINE_SKEW_MS;
    cancelled.abort(
      atDeadline
        ? new DOMException("the call's deadline passed", "TimeoutError")
        : new DOMException("the caller cancelled the call", "AbortError"),
    );
  });
  const signal = Number.isFinite(at)
    ? AbortSignal.any([cancelled.signal, AbortSignal.timeout(Math.max(0, at - Date.now()))])
    : cancelled.signal;
  // Every hypervisor request of the call listens on this one signal; an Attach asks
  // every other VM at once whether it holds the device, so past 10 VMs Node would
  // print a MaxListenersExceededWarning ("possible memory leak") on every Attach.
  setMaxListeners(0, signal);
  return signal;
}

/**
 * Binds typed handlers to a service definition. A handler's rejection goes
 * through `toStatus`; a method without a handler is a type error.
 */
export function serviceImplementation<S extends DescService>(
  service: S,
  handlers: ServiceHandlers<S>,
  toStatus: ErrorToStatus,
): grpc.UntypedServiceImplementation {
  const implementation: grpc.UntypedServiceImplementation = {};
  for (const method of unaryMethods(service)) {
    const handler = (handlers as Record<string, UnaryHandler<DescMethod>>)[method.localName];
    if (handler === undefined) throw new Error(`${service.typeName}.${method.name} has no handler`);
    const unary: grpc.handleUnaryCall<Message, Message> = (call, callback) => {
      const trailers = new grpc.Metadata();
      handler(call.request as never, { signal: callSignal(call), call, trailers, deadline: deadlineOf(call) }).then(
        (response) => callback(null, create(method.output, response as never), trailers),
        (err: unknown) => {
          const status = toStatus(err);
          const metadata = status.metadata ?? new grpc.Metadata();
          metadata.merge(trailers);
          callback({ ...status, metadata } as grpc.ServerErrorResponse);
        },
      );
    };
    implementation[method.name] = unary;
  }
  return implementation;
}

export interface CallOptions {
  /** Deadline for this call, from now. */
  timeoutMs?: number;
  metadata?: grpc.Metadata;
}

/** The names of a service's unary methods (for a generated service: all of vfiod's, Health's Check and List). */
type UnaryMethodNames<S extends DescService> = {
  [K in keyof Methods<S>]: Methods<S>[K] extends { methodKind: "unary" } ? K : never;
}[keyof Methods<S>];

/** A typed promise client with one function per unary method of the service. */
export type ServiceClient<S extends DescService> = {
  [K in UnaryMethodNames<S>]: (
    request: MessageInitShape<InputOf<Methods<S>[K]>>,
    options?: CallOptions,
  ) => Promise<MessageShape<OutputOf<Methods<S>[K]>>>;
} & {
  /** The underlying grpc-js client (for waitForReady, channel state). */
  readonly grpc: grpc.Client;
  close(): void;
};

/**
 * A typed promise client for a protoc-gen-es service over grpc-js.
 * @throws Error when the service has a streaming method (see createUnaryClient).
 */
export function createClient<S extends DescService>(
  service: S,
  target: string,
  credentials: grpc.ChannelCredentials = grpc.credentials.createInsecure(),
  channelOptions: grpc.ChannelOptions = {},
): ServiceClient<S> {
  return clientFor(unaryMethods(service), target, credentials, channelOptions);
}

/**
 * A typed promise client for the unary methods of a service that also has streaming ones
 * (grpc.health.v1.Health: Check and List, not Watch); the others are not on it.
 */
export function createUnaryClient<S extends DescService>(
  service: S,
  target: string,
  credentials: grpc.ChannelCredentials = grpc.credentials.createInsecure(),
  channelOptions: grpc.ChannelOptions = {},
): ServiceClient<S> {
  const unary = service.methods.filter((method) => method.methodKind === "unary");
  return clientFor(unary, target, credentials, channelOptions);
}

function clientFor<S extends DescService>(
  unary: readonly DescMethod[],
  target: string,
  credentials: grpc.ChannelCredentials,
  channelOptions: grpc.ChannelOptions,
): ServiceClient<S> {
  const client = new grpc.Client(target, credentials, channelOptions);
  const methods: Record<string, unknown> = {};
  for (const method of unary) {
    methods[method.localName] = (request: MessageInitShape<DescMessage>, options: CallOptions = {}) =>
      new Promise<Message>((resolve, reject) => {
        const callOptions: grpc.CallOptions = {};
        if (options.timeoutMs !== undefined) callOptions.deadline = Date.now() + options.timeoutMs;
        client.makeUnaryRequest(
          methodPath(method),
          serializer(method.input),
          deserializer(method.output),
          create(method.input, request),
          options.metadata ?? new grpc.Metadata(),
          callOptions,
          (err, response) => (err || response === undefined ? reject(err) : resolve(response)),
        );
      });
  }
  return Object.assign(methods, { grpc: client, close: () => client.close() }) as ServiceClient<S>;
}
