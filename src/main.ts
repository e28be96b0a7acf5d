#!/usr/bin/env node
// The vfiod process: parse flags, wire the parts, serve, drain on SIGTERM/SIGINT.
import * as grpc from "@grpc/grpc-js";
import fs from "node:fs";
import { promisify } from "node:util";
import { AuditLog } from "./audit";
import { defaultBackends } from "./backends/all";
import { parseConfig, UsageError, type Config } from "./config";
import { createVfiodServer } from "./grpc/server";
import { HostPreflight } from "./host/preflight";
import { Inventory } from "./inventory/inventory";
import { createLogger, type Logger } from "./log";
import { Metrics } from "./metrics";
import { DeviceOperations } from "./service/device-operations";
import { KeyedLocks } from "./keyed-locks";
import { groupId } from "./unix-socket";

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

async function bindUnixSocket(server: grpc.Server, config: Config, credentials: grpc.ServerCredentials): Promise<void> {
  const path = config.socket;
  if (path === undefined) return;
  // A socket file left by a killed vfiod would make bind fail with EADDRINUSE.
  if (fs.existsSync(path) && fs.statSync(path).isSocket()) fs.unlinkSync(path);
  await promisify(server.bindAsync.bind(server))(`unix:${path}`, credentials);
  fs.chmodSync(path, config.socketMode);
  if (config.socketGroup !== undefined) fs.chownSync(path, -1, groupId(config.socketGroup));
}

async function serve(config: Config, log: Logger): Promise<void> {
  const operations = new DeviceOperations({
    inventory: new Inventory({ inventoryFile: config.inventory, cocoonRoot: config.cocoonRoot, log }),
    backends: defaultBackends(),
    host: new HostPreflight(config.sysfsRoot),
    locks: new KeyedLocks(),
    detachTimeoutMs: config.detachTimeoutMs,
    allowList: config.allowDevices,
    log,
  });
  const metrics = config.metricsListen === undefined ? undefined : new Metrics();
  const vfiod = createVfiodServer(operations, log, {
    allowedClients: config.allowClients,
    audit: config.auditLog === undefined ? undefined : AuditLog.open(config.auditLog),
    metrics,
  });
  if (metrics !== undefined && config.metricsListen !== undefined) {
    const { port: metricsPort } = await metrics.listen(config.metricsListen);
    log.info({ metricsListen: config.metricsListen, port: metricsPort }, "metrics serving on /metrics");
  }
  const credentials = serverCredentials(config);
  const port = await promisify(vfiod.server.bindAsync.bind(vfiod.server))(config.listen, credentials);
  await bindUnixSocket(vfiod.server, config, credentials);
  vfiod.markServing();
  log.info({ listen: config.listen, port, socket: config.socket, tls: config.tlsCert !== undefined }, "vfiod serving");

  let draining = false;
  const drain = (signal: NodeJS.Signals) => {
    if (draining) return;
    draining = true;
    log.info({ signal }, "draining: no new calls, finishing in-flight ones");
    vfiod.markNotServing();
    const force = setTimeout(() => {
      log.warn({ afterMs: DRAIN_TIMEOUT_MS }, "drain timed out; cancelling remaining calls");
      vfiod.server.forceShutdown();
    }, DRAIN_TIMEOUT_MS);
    vfiod.server.tryShutdown(() => {
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
  try {
    config = parseConfig(process.argv.slice(2));
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
  serve(config, log).catch((err: unknown) => {
    log.fatal({ err }, "vfiod failed to start");
    process.exit(1);
  });
}

if (require.main === module) main();
