#!/usr/bin/env node
// The vfiod process: parse flags, wire the parts, serve, drain on SIGTERM/SIGINT.
import * as grpc from "@grpc/grpc-js";
import fs from "node:fs";
import { promisify } from "node:util";
import { AuditLog } from "./audit";
import { parseConfig, socketGroupId, UsageError, type Config } from "./config";
import { createLogger, type Logger } from "./log";
import type { Metrics } from "./metrics";
import { warnUnmanaged } from "./service/managed-binding";
import { bindPrivately } from "./unix-socket";
import { assembleVfiod } from "./vfiod";

/** How long draining waits for in-flight calls before cutting them off. */
const DRAIN_TIMEOUT_MS = 30_000;

function serverCredentials(config: Config): grpc.ServerCredentials {
  if (config.tlsCert === undefined || config.tlsKey === undefined) return grpc.ServerCredentials.createInsecure();
  const rootCerts = config.tlsClientCa === undefined ? null : fs.readFileSync(config.tlsClientCa);
  return grpc.ServerCredentials.createSsl(
    rootCerts,
    [{ cert_chain: fs.readFileSync(config.tlsCert), private_key: fs.readFileSync(config.tlsKey) }],
    rootCerts !== null,
  );
}

async function serve(config: Config, socketGid: number | undefined, log: Logger): Promise<void> {
  // prom-client is loaded only to serve metrics: it costs every other vfiod about 1.6 MB of heap.
  const metrics: Metrics | undefined =
    config.metricsListen === undefined ? undefined : new (await import("./metrics.js")).Metrics();
  const vfiod = assembleVfiod({
    log,
    inventoryFile: config.inventory,
    cocoonRoot: config.cocoonRoot,
    cocoonBinaries: config.cocoonBinaries,
    sysfsRoot: config.sysfsRoot,
    procRoot: config.procRoot,
    detachTimeoutMs: config.detachTimeoutMs,
    hypervisorTimeoutMs: config.hypervisorTimeoutMs,
    refreshIntervalMs: config.refreshIntervalMs,
    allowList: config.allowDevices,
    binding: config.manageBinding ? { stateDir: config.stateDir } : undefined,
    server: {
      allowedClients: config.allowClients,
      audit: config.auditLog === undefined ? undefined : AuditLog.open(config.auditLog),
      metrics,
    },
  });
  const { server } = vfiod.server;
  if (metrics !== undefined && config.metricsListen !== undefined) {
    const { port: metricsPort } = await metrics.listen(config.metricsListen);
    log.info({ metricsListen: config.metricsListen, port: metricsPort }, "metrics serving on /metrics");
  }
  // Reads every process's open files once, so the first Attach's scan reads only what changed.
  if (vfiod.holders.canSeeOthers()) vfiod.holders.index(AbortSignal.timeout(60_000)).catch(() => undefined);
  // Before any call is served: what an earlier vfiod left half-done in --state-dir.
  if (vfiod.binding !== undefined) await vfiod.binding.repair();
  else await warnUnmanaged(config.stateDir, log);
  if (config.insecure) {
    log.warn("--insecure: plaintext gRPC and metrics allowed off the loopback; whoever reaches the port can hand host devices to VMs");
  }
  const credentials = serverCredentials(config);
  const bind = promisify(server.bindAsync.bind(server));
  const port = config.listen === undefined ? undefined : await bind(config.listen, credentials);
  if (config.socket !== undefined) {
    await bindPrivately(config.socket, config.socketMode, socketGid, async (privatePath) => {
      await bind(`unix:${privatePath}`, credentials);
    });
  }
  vfiod.refresher.start();
  vfiod.binding?.start();
  vfiod.server.markServing();
  log.info({ listen: config.listen ?? "none", port, socket: config.socket, tls: config.tlsCert !== undefined }, "vfiod serving");

  let draining = false;
  const drain = (signal: NodeJS.Signals) => {
    if (draining) return;
    draining = true;
    log.info({ signal }, "draining: no new calls, finishing in-flight ones");
    vfiod.refresher.stop();
    vfiod.binding?.stop();
    vfiod.server.markNotServing();
    // Watches never finish on their own: end them, so draining waits only for calls that do.
    vfiod.watch.closeAll();
    const force = setTimeout(() => {
      log.warn({ afterMs: DRAIN_TIMEOUT_MS }, "drain timed out; cancelling remaining calls");
      server.forceShutdown();
    }, DRAIN_TIMEOUT_MS);
    server.tryShutdown(() => {
      clearTimeout(force);
      if (config.socket !== undefined) fs.rmSync(config.socket, { force: true });
      log.info("vfiod stopped");
      process.exit(0);
    });
  };
  process.on("SIGTERM", drain);
  process.on("SIGINT", drain);
}

function main(): void {
  let config: Config;
  let socketGid: number | undefined;
  try {
    config = parseConfig(process.argv.slice(2));
    socketGid = config.socketGroup === undefined ? undefined : socketGroupId(config.socketGroup);
  } catch (err) {
    if (!(err instanceof UsageError)) throw err;
    if (err.message === "") {
      process.stdout.write(err.usage);
      process.exit(0);
    }
    process.stderr.write(`vfiod: ${err.message}\n\n${err.usage}`);
    process.exit(2);
  }
  const log = createLogger(config.logLevel);
  serve(config, socketGid, log).catch((err: unknown) => {
    log.fatal({ err }, "vfiod failed to start");
    process.exit(1);
  });
}

if (require.main === module) main();
