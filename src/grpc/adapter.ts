// Maps protoc-gen-es service descriptors onto @grpc/grpc-js, in both directions:
// a server-side service definition plus typed handlers, and a typed client, for
// unary and server-streaming methods. protoc-gen-es v2 emits descriptors, not
// grpc-js stubs; this is the one place that bridges them (walks
// DescService.methods, keys by /package.Service/Method).
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

/** The parts of a grpc-js server call, unary or streaming, a handler may use. */
export type ServerCall = Pick<
  grpc.ServerUnaryCall<Message, Message>,
  "metadata" | "getPeer" | "getAuthContext" | "sendMetadata" | "getDeadline"
>;

/** What a handler gets besides the request. */
export interface CallContext {
  /** Aborts when the caller's deadline passes (reason: TimeoutError) or the caller cancels. */
  readonly signal: AbortSignal;
  readonly call: ServerCall;
  /** Sent with the call's status, whether it succeeds or fails. */
  readonly trailers: grpc.Metadata;
  /** The caller's deadline (ms since epoch), when it gave one. */
  readonly deadline: number | undefined;
}

export type UnaryHandler<M> = (
  request: MessageShape<InputOf<M>>,
  context: CallContext,
) => Promise<MessageInitShape<OutputOf<M>>>;

/** Where a server-streaming handler sends its messages. */
export interface StreamSink<M> {
  /** Queues a message; false once grpc-js's buffer is full (wait for `drained()` before more). */
  write(message: MessageInitShape<OutputOf<M>>): boolean;
  /** Resolves when the buffer has room again, or the call ends. */
  drained(): Promise<void>;
}

/** Sends messages until it resolves (then the call ends OK) or rejects (the call ends with that status). */
export type ServerStreamHandler<M> = (
  request: MessageShape<InputOf<M>>,
  context: CallContext,
  sink: StreamSink<M>,
) => Promise<void>;

export type ServiceHandlers<S extends DescService> = {
  [K in keyof Methods<S>]: Methods<S>[K] extends { methodKind: "server_streaming" }
    ? ServerStreamHandler<Methods<S>[K]>
    : UnaryHandler<Methods<S>[K]>;
};

/** Turns whatever a handler threw into the status the caller gets. */
export type ErrorToStatus = (err: unknown) => Partial<grpc.StatusObject>;

/** The methods this adapter serves: unary and server-streaming. */
function supportedMethods(service: DescService): DescMethod[] {
  for (const method of service.methods) {
    if (method.methodKind !== "unary" && method.methodKind !== "server_streaming") {
      throw new Error(`${service.typeName}.${method.name}: only unary and server-streaming methods are supported, not ${method.methodKind}`);
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

/** The grpc-js definition of a protoc-gen-es service (unary and server-streaming methods). */
export function serviceDefinition(service: DescService): grpc.ServiceDefinition {
  const definition: Record<string, grpc.MethodDefinition<Message, Message>> = {};
  for (const method of supportedMethods(service)) {
    definition[method.name] = {
      path: methodPath(method),
      requestStream: false,
      responseStream: method.methodKind === "server_streaming",
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
function deadlineOf(call: ServerCall): number | undefined {
  const deadline = call.getDeadline();
  const at = deadline instanceof Date ? deadline.getTime() : deadline;
  return Number.isFinite(at) ? at : undefined;
}

/**
 * An AbortSignal that follows the call's deadline (reason TimeoutError) and its
 * cancellation (AbortError) until `settled()`: grpc-js reports every call that
 * ends, however it ended, as "cancelled" once its status is sent.
 */
export function callSignal(call: grpc.ServerUnaryCall<Message, Message> | grpc.ServerWritableStream<Message, Message>): {
  signal: AbortSignal;
  settled(): void;
} {
  const at = deadlineOf(call) ?? Infinity;
  const cancelled = new AbortController();
  let done = false;
  call.once("cancelled", () => {
    if (done) return;
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
  // The call's waits (locks, shared reads, hypervisor requests, a watch) all listen on
  // this one signal: more than Node's default of 10 is not a leak.
  setMaxListeners(0, signal);
  return { signal, settled: () => (done = true) };
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
  for (const method of supportedMethods(service)) {
    const handler = (handlers as Record<string, unknown>)[method.localName];
    if (handler === undefined) throw new Error(`${service.typeName}.${method.name} has no handler`);
    implementation[method.name] =
      method.methodKind === "server_streaming"
        ? serverStream(method, handler as ServerStreamHandler<DescMethod>, toStatus)
        : unary(method, handler as UnaryHandler<DescMethod>, toStatus);
  }
  return implementation;
}

/** The status of a failed call, carrying `trailers` too. */
function failedStatus(err: unknown, trailers: grpc.Metadata, toStatus: ErrorToStatus): grpc.ServerErrorResponse {
  const status = toStatus(err);
  const metadata = status.metadata ?? new grpc.Metadata();
  metadata.merge(trailers);
  return { ...status, metadata } as grpc.ServerErrorResponse;
}

function unary(method: DescMethod, handler: UnaryHandler<DescMethod>, toStatus: ErrorToStatus): grpc.handleUnaryCall<Message, Message> {
  return (call, callback) => {
    const trailers = new grpc.Metadata();
    const { signal, settled } = callSignal(call);
    handler(call.request as never, { signal, call, trailers, deadline: deadlineOf(call) }).then(
      (response) => {
        settled();
        callback(null, create(method.output, response as never), trailers);
      },
      (err: unknown) => {
        settled();
        callback(failedStatus(err, trailers, toStatus));
      },
    );
  };
}

function serverStream(
  method: DescMethod,
  handler: ServerStreamHandler<DescMethod>,
  toStatus: ErrorToStatus,
): grpc.handleServerStreamingCall<Message, Message> {
  return (call) => {
    const trailers = new grpc.Metadata();
    const { signal, settled } = callSignal(call);
    const sink: StreamSink<DescMethod> = {
      write: (message) => call.write(create(method.output, message as never)),
      drained: () =>
        new Promise<void>((resolve) => {
          if (!call.writableNeedDrain || signal.aborted) return resolve();
          const done = () => {
            call.off("drain", done);
            signal.removeEventListener("abort", done);
            resolve();
          };
          call.once("drain", done);
          signal.addEventListener("abort", done, { once: true });
        }),
    };
    handler(call.request as never, { signal, call, trailers, deadline: deadlineOf(call) }, sink).then(
      () => {
        settled();
        call.end(trailers);
      },
      (err: unknown) => {
        settled();
        call.emit("error", failedStatus(err, trailers, toStatus));
      },
    );
  };
}

export interface CallOptions {
  /** Deadline for this call, from now. */
  timeoutMs?: number;
  metadata?: grpc.Metadata;
}

export type ServiceClient<S extends DescService> = {
  [K in keyof Methods<S>]: Methods<S>[K] extends { methodKind: "server_streaming" }
    ? (
        request: MessageInitShape<InputOf<Methods<S>[K]>>,
        options?: CallOptions,
      ) => grpc.ClientReadableStream<MessageShape<OutputOf<Methods<S>[K]>>>
    : (
        request: MessageInitShape<InputOf<Methods<S>[K]>>,
        options?: CallOptions,
      ) => Promise<MessageShape<OutputOf<Methods<S>[K]>>>;
} & {
  /** The underlying grpc-js client (for waitForReady, channel state). */
  readonly grpc: grpc.Client;
  close(): void;
};

/**
 * A typed client for a protoc-gen-es service over grpc-js: a promise per unary
 * method, a readable stream of messages per server-streaming one.
 */
export function createClient<S extends DescService>(
  service: S,
  target: string,
  credentials: grpc.ChannelCredentials = grpc.credentials.createInsecure(),
  channelOptions: grpc.ChannelOptions = {},
): ServiceClient<S> {
  const client = new grpc.Client(target, credentials, channelOptions);
  const methods: Record<string, unknown> = {};
  const callOptionsOf = (options: CallOptions): grpc.CallOptions =>
    options.timeoutMs === undefined ? {} : { deadline: Date.now() + options.timeoutMs };
  for (const method of supportedMethods(service)) {
    methods[method.localName] =
      method.methodKind === "server_streaming"
        ? (request: MessageInitShape<DescMessage>, options: CallOptions = {}) =>
            client.makeServerStreamRequest(
              methodPath(method),
              serializer(method.input),
              deserializer(method.output),
              create(method.input, request),
              options.metadata ?? new grpc.Metadata(),
              callOptionsOf(options),
            )
        : (request: MessageInitShape<DescMessage>, options: CallOptions = {}) =>
            new Promise<Message>((resolve, reject) => {
              client.makeUnaryRequest(
                methodPath(method),
                serializer(method.input),
                deserializer(method.output),
                create(method.input, request),
                options.metadata ?? new grpc.Metadata(),
                callOptionsOf(options),
                (err, response) => (err || response === undefined ? reject(err) : resolve(response)),
              );
            });
  }
  return Object.assign(methods, { grpc: client, close: () => client.close() }) as ServiceClient<S>;
}
