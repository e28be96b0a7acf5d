// An in-process vfiod (the real server, operations and backends) on a real
// TCP port, with a typed client, for tests that drive the gRPC API.
import * as grpc from "@grpc/grpc-js";
import { promisify } from "node:util";
import { defaultBackends } from "../../src/backends/all";
import type { BackendRegistry } from "../../src/backends/registry";
import { createDeviceClient, errorReason, type DeviceClient } from "../../src/grpc/client";
import { createVfiodServer, type VfiodServerOptions } from "../../src/grpc/server";
import type { DeviceAllowList } from "../../src/host/device-allow-list";
import { HostPreflight } from "../../src/host/preflight";
import { Inventory } from "../../src/inventory/inventory";
import { silentLogger, type Logger } from "../../src/log";
import { DeviceOperations } from "../../src/service/device-operations";
import { KeyedLocks } from "../../src/keyed-locks";

export interface TestServerOptions {
  inventoryFile?: string;
  cocoonRoot?: string;
  procRoot?: string;
  sysfsRoot: string;
  detachTimeoutMs?: number;
  backends?: BackendRegistry;
  allowList?: DeviceAllowList;
  server?: VfiodServerOptions;
  log?: Logger;
}

export interface TestServer {
  readonly address: string;
  readonly client: DeviceClient;
  stop(): Promise<void>;
}

export async function startTestServer(options: TestServerOptions): Promise<TestServer> {
  const log = options.log ?? silentLogger();
  const operations = new DeviceOperations({
    inventory: new Inventory({
      inventoryFile: options.inventoryFile,
      cocoonRoot: options.cocoonRoot ?? "/nonexistent/cocoon",
      procRoot: options.procRoot,
      log,
    }),
    backends: options.backends ?? defaultBackends(),
    host: new HostPreflight(options.sysfsRoot),
    locks: new KeyedLocks(),
    detachTimeoutMs: options.detachTimeoutMs ?? 2000,
    allowList: options.allowList,
    log,
  });
  const vfiod = createVfiodServer(operations, log, options.server);
  const port = await promisify(vfiod.server.bindAsync.bind(vfiod.server))("127.0.0.1:0", grpc.ServerCredentials.createInsecure());
  vfiod.markServing();
  const address = `127.0.0.1:${port}`;
  const client = createDeviceClient(address);
  return {
    address,
    client,
    stop: async () => {
      client.close();
      await new Promise<void>((resolve) => vfiod.server.tryShutdown(() => resolve()));
    },
  };
}

/** The gRPC code and ErrorInfo reason of a call that must fail. */
export async function failure(call: Promise<unknown>): Promise<{ code: number; reason: string | undefined; message: string }> {
  try {
    await call;
  } catch (err) {
    const e = err as grpc.ServiceError;
    return { code: e.code, reason: errorReason(err), message: e.details };
  }
  throw new Error("the call succeeded but was expected to fail");
}
