#!/usr/bin/env node
// vfiodctl: the operator's gRPC client for vfiod (attach, detach, list; VMs, host devices, health).
import * as grpc from "@grpc/grpc-js";
import { toJson } from "@bufbuild/protobuf";
import { Command, CommanderError, Option } from "commander";
import fs from "node:fs";
import { HealthCheckResponse_ServingStatus } from "../gen/grpc/health/v1/health_pb";
import { timestampDate } from "@bufbuild/protobuf/wkt";
import { WatchEvent_Kind, WatchEventSchema, type Device, type WatchEvent } from "../gen/vfiod/v1/device_pb";
import { HostDeviceSchema, VmSchema, type HostDevice, type Vm } from "../gen/vfiod/v1/inventory_pb";
import { parseDuration } from "./config";
import { createDeviceClient, createHealthClient, createInventoryClient, errorInfo } from "./grpc/client";

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

const printJson = (value: unknown) => process.stdout.write(`${JSON.stringify(value)}\n`);

/** Text from vfiod (a hypervisor's state or error text may hold newlines or escapes) on one line. */
const oneLine = (text: string) => text.replace(/\p{Cc}+/gu, " ");

/** Rows as columns two spaces apart; the last column is not padded, so a long last cell widens only its own line. */
function tableLines(rows: readonly (readonly string[])[]): string[] {
  const cells = rows.map((row) => row.map(oneLine));
  const widths = cells[0]!.map((_, i) => Math.max(...cells.map((r) => r[i]!.length)));
  return cells.map((row) => row.map((c, i) => c.padEnd(widths[i]!)).join("  ").trimEnd());
}

/** Where to wrap long text: the terminal's width, 120 columns into a pipe or file. */
function lineWidth(): number {
  return process.stdout.isTTY && process.stdout.columns > 0 ? process.stdout.columns : 120;
}

/**
 * `text` in lines of at most `width` characters starting with `indent`, broken after a "; "
 * where it can (so a line of a preflight's fix holds whole commands), else between words.
 */
function wrap(text: string, indent: string, width: number): string[] {
  const room = Math.max(20, width - indent.length);
  const lines: string[] = [];
  let line = "";
  const put = (piece: string) => {
    if (line === "") line = piece;
    else if (line.length + 1 + piece.length <= room) line += ` ${piece}`;
    else {
      lines.push(line);
      line = piece;
    }
  };
  for (const clause of oneLine(text).trim().split(/(?<=;) +/)) {
    if (clause.length <= room) put(clause);
    else for (const word of clause.split(/ +/)) put(word);
  }
  if (line !== "") lines.push(line);
  return lines.map((l) => indent + l);
}

function printDevices(devices: Device[], json: boolean): void {
  const plain = devices.map((d) => ({ id: d.id, bdf: d.bdf, path: d.path, guestBdf: d.guestBdf }));
  if (json) {
    printJson(plain);
    return;
  }
  if (plain.length === 0) {
    process.stdout.write("no VFIO devices attached\n");
    return;
  }
  const rows = [["ID", "HOST BDF", "GUEST BDF"], ...plain.map((d) => [d.id, d.bdf || "-", d.guestBdf || "-"])];
  for (const line of tableLines(rows)) process.stdout.write(`${line}\n`);
}

/**
 * VMs, STATE last and in full: past "Running" or "Paused" it says why ("unreachable: ...",
 * "not running: ...", "unknown: ..."), which is what an operator lists VMs for; as the last
 * column, a long state lengthens only its own line.
 */
function printVms(vms: Vm[], json: boolean): void {
  if (json) {
    printJson(vms.map((vm) => toJson(VmSchema, vm, { alwaysEmitImplicit: true })));
    return;
  }
  if (vms.length === 0) {
    process.stdout.write("no VMs\n");
    return;
  }
  const rows = [["ID", "NAME", "HYPERVISOR", "SOURCE", "STATE"], ...vms.map((vm) => [vm.id, vm.name, vm.hypervisor, vm.source, vm.state])];
  for (const line of tableLines(rows)) process.stdout.write(`${line}\n`);
}

/** Who holds a device: the VM's id, else the process's pid. */
function holder(d: HostDevice): string {
  if (d.heldByVm !== "") return d.heldByVm;
  return d.heldByPid !== 0 ? `pid ${d.heldByPid}` : "-";
}

/** Host devices, one row each; under a device that is not ready, why, indented and wrapped. */
function printHostDevices(devices: HostDevice[], vfioOnly: boolean, json: boolean): void {
  if (json) {
    printJson(devices.map((d) => toJson(HostDeviceSchema, d, { alwaysEmitImplicit: true })));
    return;
  }
  if (devices.length === 0) {
    process.stdout.write(vfioOnly ? "no PCI devices on a VFIO driver\n" : "no PCI devices\n");
    return;
  }
  const number = (n: number) => (n < 0 ? "-" : String(n));
  const rows = devices.map((d) => [
    d.bdf,
    `${d.vendorId}:${d.deviceId}`,
    d.classCode || "-",
    d.driver || "-",
    number(d.iommuGroup),
    d.ready ? "yes" : "no",
    holder(d),
    number(d.numaNode),
  ]);
  const [header, ...lines] = tableLines([["BDF", "VENDOR:DEVICE", "CLASS", "DRIVER", "GROUP", "READY", "HELD BY", "NUMA"], ...rows]);
  const out = [header!];
  devices.forEach((d, i) => {
    out.push(lines[i]!);
    if (!d.ready && d.notReadyReason !== "") out.push(...wrap(d.notReadyReason, "    ", lineWidth()));
  });
  process.stdout.write(`${out.join("\n")}\n`);
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

async function withClient<C extends { close(): void }>(
  o: GlobalOptions,
  create: (target: string, credentials: grpc.ChannelCredentials) => C,
  fn: (client: C) => Promise<void>,
): Promise<void> {
  const client = create(o.address, credentials(o));
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
    .description("talk to vfiod: attach, detach and list VFIO PCI devices of running VMs; list VMs and host devices; check health")
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
    .configureHelp({ showGlobalOptions: true })
    .addHelpText(
      "after",
      [
        "",
        "Exit status: 0 done; 1 vfiod refused the call or could not be reached (its code",
        'and reason on stderr, or {"error": ...} on stdout with --json), or health is not',
        "SERVING; 2 usage error.",
      ].join("\n"),
    )
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
    .summary("hot-plug host PCI device <pci> into <vm>")
    .description(
      "hot-plug host PCI device <pci> (01:00.0, 0000:01:00.0 or /sys/bus/pci/devices/<bdf>) into <vm>; " +
        "prints it (with --whole-group, then its companions) as a table, or with --json as one array, " +
        "[device, ...companions]",
    )
    .option("--id <id>", "device id in the VM (default: chosen by the hypervisor)", "")
    .option(
      "--whole-group",
      "also attach the other endpoints of <pci>'s IOMMU group, after it, all or nothing; each gets the " +
        "id <id>-<bus>-<device>-<function> (gpu0-01-00-1 for 0000:01:00.1)",
    )
    .option(
      "--managed",
      "let vfiod bind <pci> from its host driver to vfio-pci first, and give it back on detach " +
        "(vfiod must run with --manage-binding and list it in --allow-devices)",
    )
    .action((vm: string, pci: string, sub: { id: string; wholeGroup?: boolean; managed?: boolean }) =>
      withClient(opts(), createDeviceClient, async (client) => {
        const { device, companions } = await client.attach(
          { vm, pci, id: sub.id, wholeGroup: sub.wholeGroup === true, managed: sub.managed === true },
          { timeoutMs: opts().timeout },
        );
        printDevices([...(device === undefined ? [] : [device]), ...companions], opts().json);
      }),
    );
  program
    .command("detach <vm> <id>")
    .summary("remove device <id> from <vm>")
    .description("remove device <id> from <vm>, waiting for the guest to release it")
    .option("--whole-group", "first remove the companions a whole-group attach added with <id> (<id>-<bus>-<device>-<function>)")
    .action((vm: string, id: string, sub: { wholeGroup?: boolean }) =>
      withClient(opts(), createDeviceClient, async (client) => {
        const wholeGroup = sub.wholeGroup === true;
        await client.detach({ vm, id, wholeGroup }, { timeoutMs: opts().timeout });
        if (opts().json) printJson({ vm, id, detached: true, wholeGroup });
        else process.stdout.write(`detached ${id}${wholeGroup ? " and its companions" : ""} from ${vm}\n`);
      }),
    );
  program
    .command("list <vm>")
    .description("list the VFIO devices <vm> holds now")
    .action((vm: string) =>
      withClient(opts(), createDeviceClient, async (client) => {
        const { devices } = await client.list({ vm }, { timeoutMs: opts().timeout });
        printDevices(devices, opts().json);
      }),
    );
  program
    .command("vms")
    .summary("list the VMs vfiod can see, with their state")
    .description(
      "list the VMs vfiod can see (the --inventory file, cocoon's records) with the state their hypervisor " +
        "reports; STATE is shown in full: when a VM is not running it says why",
    )
    .action(() =>
      withClient(opts(), createInventoryClient, async (inventory) => {
        const { vms } = await inventory.listVms({}, { timeoutMs: opts().timeout });
        printVms(vms, opts().json);
      }),
    );
  program
    .command("devices")
    .summary("list the host's PCI devices: ready to attach? held by whom?")
    .description(
      "list the host's PCI endpoints (bridges left out): ids, class, driver, IOMMU group, whether an attach " +
        "would pass now, who holds it (a VM's id, else a pid), NUMA node; under a device that is not ready, why",
    )
    .option("--vfio-only", "only devices bound to a VFIO driver (vfio-pci or a variant)")
    .action((sub: { vfioOnly?: boolean }) =>
      withClient(opts(), createInventoryClient, async (inventory) => {
        const vfioOnly = sub.vfioOnly === true;
        const { devices } = await inventory.listHostDevices({ vfioOnly }, { timeoutMs: opts().timeout });
        printHostDevices(devices, vfioOnly, opts().json);
      }),
    );
  program
    .command("health [service]")
    .summary("check that vfiod serves (exit 0 only when SERVING)")
    .description(
      'grpc.health.v1.Health/Check of [service] ("", the default: vfiod as a whole; vfiod.v1.DeviceService; ' +
        "vfiod.v1.InventoryService): prints its status and exits 0 only when it is SERVING, 1 otherwise " +
        "(NOT_SERVING, an unknown service, vfiod unreachable)",
    )
    .action((service = "") =>
      withClient(opts(), createHealthClient, async (health) => {
        const { status } = await health.check({ service }, { timeoutMs: opts().timeout });
        const name = HealthCheckResponse_ServingStatus[status] ?? String(status);
        if (opts().json) printJson({ service, status: name });
        else process.stdout.write(`${name}\n`);
        if (status !== HealthCheckResponse_ServingStatus.SERVING) process.exitCode = 1;
      }),
    );
  program
    .command("watch [vm]")
    .summary("print device events as they come (every VM without [vm])")
    .description(
      "vfiod.v1.DeviceService/Watch: first PRESENT per device already attached, then SYNCED, then each change " +
        "(ATTACHED, DETACH_REQUESTED, DETACH_PENDING, DETACHED, DRIVER_BOUND, DRIVER_RESTORED), one line each, " +
        "until interrupted (exit 0) or vfiod ends the watch (its reason printed, exit 1); --timeout does not apply",
    )
    .action((vm = "") =>
      withClient(opts(), createDeviceClient, async (client) => {
        const stream = client.watch({ vm });
        const stop = () => stream.cancel();
        process.once("SIGINT", stop);
        process.once("SIGTERM", stop);
        try {
          await new Promise<void>((resolve, reject) => {
            stream.on("data", (event: WatchEvent) => printWatchEvent(event, opts().json));
            stream.on("error", (err: grpc.ServiceError) => (err.code === grpc.status.CANCELLED ? resolve() : reject(err)));
            stream.on("end", () => resolve());
          });
        } finally {
          process.off("SIGINT", stop);
          process.off("SIGTERM", stop);
        }
      }),
    );
  return program;
}

/** One line per event: time, kind, VM, device id and host BDF, detail; or the event's proto3 JSON. */
function printWatchEvent(event: WatchEvent, json: boolean): void {
  if (json) {
    printJson(toJson(WatchEventSchema, event));
    return;
  }
  const time = event.time === undefined ? "-" : timestampDate(event.time).toISOString();
  const kind = WatchEvent_Kind[event.kind] ?? String(event.kind);
  const device = event.device === undefined ? "" : `${event.device.id} ${event.device.bdf || "-"}`;
  const line = [time, kind, event.vm, device, event.detail === "" ? "" : `(${event.detail})`].filter((part) => part !== "");
  process.stdout.write(`${line.join(" ").replace(/[\u0000-\u001f\u007f]+/g, " ")}\n`);
}

if (require.main === module) {
  buildCli()
    .parseAsync(process.argv)
    .catch((err: unknown) => {
      if (err instanceof CommanderError) process.exit(err.exitCode === 0 ? 0 : 2);
      throw err;
    });
}
