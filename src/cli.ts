#!/usr/bin/env node
// vfiodctl: the operator's gRPC client for vfiod (attach, detach, list).
import * as grpc from "@grpc/grpc-js";
import { Command, CommanderError, Option } from "commander";
import fs from "node:fs";
import type { Device } from "../gen/vfiod/v1/device_pb";
import { parseDuration } from "./config";
import { createDeviceClient, errorInfo, type DeviceClient } from "./grpc/client";

interface GlobalOptions {
  address: string;
  timeout: number;
  json: boolean;
  tlsCa?: string;
  tlsCert?: string;
  tlsKey?: string;
}

function credentials(o: GlobalOptions): grpc.ChannelCredentials {
  if (o.tlsCa === undefined) return grpc.credentials.createInsecure();
  const read = (file: string | undefined) => (file === undefined ? null : fs.readFileSync(file));
  return grpc.credentials.createSsl(read(o.tlsCa), read(o.tlsKey), read(o.tlsCert));
}

function printDevices(devices: Device[], json: boolean): void {
  const plain = devices.map((d) => ({ id: d.id, bdf: d.bdf, path: d.path, guestBdf: d.guestBdf }));
  if (json) {
    process.stdout.write(`${JSON.stringify(plain)}\n`);
    return;
  }
  if (plain.length === 0) {
    process.stdout.write("no VFIO devices attached\n");
    return;
  }
  const rows = [["ID", "HOST BDF", "GUEST BDF"], ...plain.map((d) => [d.id, d.bdf || "-", d.guestBdf || "-"])];
  const widths = rows[0]!.map((_, i) => Math.max(...rows.map((r) => r[i]!.length)));
  for (const row of rows) process.stdout.write(`${row.map((c, i) => c.padEnd(widths[i]!)).join("  ").trimEnd()}\n`);
}

/** Prints a failed call as "CODE REASON: message" (or JSON) and sets exit code 1. */
function printError(err: unknown, json: boolean): void {
  const code = typeof err === "object" && err !== null && "code" in err ? Number(err.code) : grpc.status.UNKNOWN;
  const details = typeof err === "object" && err !== null && "details" in err ? String(err.details) : String(err);
  const reason = errorInfo(err)?.reason ?? "";
  const codeName = grpc.status[code] ?? String(code);
  if (json) process.stdout.write(`${JSON.stringify({ error: { code: codeName, reason, message: details } })}\n`);
  else process.stderr.write(`error: ${codeName}${reason === "" ? "" : ` ${reason}`}: ${details}\n`);
  process.exitCode = 1;
}

async function withClient(o: GlobalOptions, fn: (client: DeviceClient) => Promise<void>): Promise<void> {
  const client = createDeviceClient(o.address, credentials(o));
  try {
    await fn(client);
  } catch (err) {
    printError(err, o.json);
  } finally {
    client.close();
  }
}

export function buildCli(): Command {
  const program = new Command("vfiodctl")
    .description("talk to vfiod: attach, detach and list VFIO PCI devices of running VMs")
    .addOption(
      new Option("-a, --address <target>", "vfiod address: host:port or unix:/path")
        .default("127.0.0.1:50051")
        .env("VFIOD_ADDRESS"),
    )
    .addOption(new Option("-t, --timeout <duration>", "deadline per call").default(30_000, "30s").argParser(parseDuration))
    .option("--json", "print JSON", false)
    .option("--tls-ca <file>", "CA (PEM) that signed vfiod's certificate; enables TLS")
    .option("--tls-cert <file>", "client certificate (PEM) for mTLS")
    .option("--tls-key <file>", "client key (PEM) for mTLS")
    .exitOverride();
  const opts = () => program.opts<GlobalOptions>();
  // A client certificate without the CA that checks vfiod's would silently talk plaintext.
  program.hook("preAction", () => {
    const o = opts();
    if ((o.tlsCert !== undefined || o.tlsKey !== undefined) && o.tlsCa === undefined) {
      program.error("vfiodctl: --tls-cert/--tls-key need --tls-ca (the CA that signed vfiod's certificate)", { exitCode: 2 });
    }
    if ((o.tlsCert === undefined) !== (o.tlsKey === undefined)) {
      program.error("vfiodctl: --tls-cert and --tls-key go together", { exitCode: 2 });
    }
  });

  program
    .command("attach <vm> <pci>")
    .description("hot-plug host PCI device <pci> (01:00.0, 0000:01:00.0 or /sys/bus/pci/devices/<bdf>) into <vm>")
    .option("--id <id>", "device id in the VM (default: chosen by the hypervisor)", "")
    .action((vm: string, pci: string, sub: { id: string }) =>
      withClient(opts(), async (client) => {
        const { device } = await client.attach({ vm, pci, id: sub.id }, { timeoutMs: opts().timeout });
        printDevices(device === undefined ? [] : [device], opts().json);
      }),
    );
  program
    .command("detach <vm> <id>")
    .description("remove device <id> from <vm>, waiting for the guest to release it")
    .action((vm: string, id: string) =>
      withClient(opts(), async (client) => {
        await client.detach({ vm, id }, { timeoutMs: opts().timeout });
        process.stdout.write(opts().json ? `${JSON.stringify({ vm, id, detached: true })}\n` : `detached ${id} from ${vm}\n`);
      }),
    );
  program
    .command("list <vm>")
    .description("list the VFIO devices <vm> holds now")
    .action((vm: string) =>
      withClient(opts(), async (client) => {
        const { devices } = await client.list({ vm }, { timeoutMs: opts().timeout });
        printDevices(devices, opts().json);
      }),
    );
  return program;
}

if (require.main === module) {
  buildCli()
    .parseAsync(process.argv)
    .catch((err: unknown) => {
      if (err instanceof CommanderError) process.exit(err.exitCode === 0 ? 0 : 2);
      throw err;
    });
}
