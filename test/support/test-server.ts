// An in-process vfiod (the real server, operations and backends) on a real
// TCP port, with a typed client, for tests that drive the gRPC API.
import * as grpc from "@grpc/grpc-js";
import { promisify } from "node:util";
import type { BackendRegistry } from "../../src/backends/registry";
import {
  createDeviceClient,
  createInventoryClient,
  errorReason,
  type DeviceClient,
  type InventoryClient,
} from "../../src/grpc/client";
import type { VfiodServerOptions } from "../../src/grpc/server";
import type { DeviceAllowList } from "../../src/host/device-allow-list";
import type { CocoonBinaries } from "../../src/inventory/cocoon";
import { silentLogger, type Logger } from "../../src/log";
import { assembleVfiod, type ManagedBindingOptions, type Vfiod } from "../../src/vfiod";

export interface TestServerOptions {
  inventoryFile?: string;
  cocoonRoot?: string;
  cocoonBinaries?: CocoonBinaries;
  procRoot?: string;
  sysfsRoot: string;
  kernelRelease?: string;
  detachTimeoutMs?: number;
  hypervisorTimeoutMs?: number;
  /** Starts the background refresh with this interval; without it, none runs (tests count hypervisor requests). */
  refreshIntervalMs?: number;
  backends?: BackendRegistry;
  allowList?: DeviceAllowList;
  server?: VfiodServerOptions;
  log?: Logger;
  /** --manage-binding with --state-dir: repaired and watched as the process does. */
  binding?: ManagedBindingOptions;
}

export interface TestServer {
  readonly address: string;
  readonly client: DeviceClient;
  readonly inventory: InventoryClient;
  readonly vfiod: Vfiod;
  stop(): Promise<void>;
}

export async function startTestServer(options: TestServerOptions): Promise<TestServer> {
  const log = options.log ?? silentLogger();
  const vfiod = assembleVfiod({
    log,
    inventoryFile: options.inventoryFile,
    cocoonRoot: options.cocoonRoot ?? "/nonexistent/cocoon",
    cocoonBinaries: options.cocoonBinaries,
    procRoot: options.procRoot,
    sysfsRoot: options.sysfsRoot,
    kernelRelease: options.kernelRelease,
    detachTimeoutMs: options.detachTimeoutMs ?? 2000,
    hypervisorTimeoutMs: options.hypervisorTimeoutMs,
    refreshIntervalMs: options.refreshIntervalMs,
    allowList: options.allowList,
    backends: options.backends,
    server: options.server,
    binding: options.binding,
  });
  await vfiod.binding?.repair();
  const { server } = vfiod.server;
  const port = await promisify(server.bindAsync.bind(server))("127.0.0.1:0", grpc.ServerCredentials.createInsecure());
  if (options.refreshIntervalMs !== undefined) vfiod.refresher.start();
  vfiod.binding?.start();
  vfiod.server.markServing();
  const address = `127.0.0.1:${port}`;
  const client = createDeviceClient(address);
  const inventory = createInventoryClient(address);
  return {
    address,
    client,
    inventory,
    vfiod,
    stop: async () => {
      vfiod.refresher.stop();
      vfiod.binding?.stop();
      client.close();
      inventory.close();
      // Open streams (a Watch a failed test did not cancel) would hold a graceful shutdown forever.
      vfiod.watch.closeAll();
      await new Promise<void>((resolve) => server.tryShutdown(() => resolve()));
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
