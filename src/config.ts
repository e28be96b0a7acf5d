// vfiod's process flags (../shared/contract.md "Process interface"), each also
// read from VFIOD_<FLAG>. Parsing is pure: it returns a Config or throws UsageError.
import { Command, CommanderError, InvalidArgumentError, Option } from "commander";
import net from "node:net";
import { DeviceAllowList } from "./host/device-allow-list";

export interface Config {
  /** HOST:PORT for gRPC over TCP. */
  readonly listen: string;
  /** Optional Unix socket path for gRPC. */
  readonly socket: string | undefined;
  readonly socketMode: number;
  readonly socketGroup: string | undefined;
  readonly inventory: string | undefined;
  readonly cocoonRoot: string;
  readonly sysfsRoot: string;
  readonly detachTimeoutMs: number;
  readonly tlsCert: string | undefined;
  readonly tlsKey: string | undefined;
  readonly tlsClientCa: string | undefined;
  readonly insecure: boolean;
  /** Certificate CNs / DNS SANs allowed to call; undefined = any client that passes TLS. */
  readonly allowClients: ReadonlySet<string> | undefined;
  readonly allowDevices: DeviceAllowList | undefined;
  readonly auditLog: string | undefined;
  readonly metricsListen: string | undefined;
  readonly logLevel: string;
}

/** Bad flags: the process prints the message and usage, and exits 2. */
export class UsageError extends Error {
  constructor(
    message: string,
    readonly usage: string,
  ) {
    super(message);
  }
}

const UNITS_MS: Record<string, number> = { ms: 1, s: 1000, m: 60_000, h: 3_600_000 };

/** "10s", "500ms", "1.5m", "2h" → milliseconds. */
export function parseDuration(text: string): number {
  const match = /^(\d+(?:\.\d+)?)(ms|s|m|h)$/.exec(text.trim());
  if (match === null) throw new InvalidArgumentError(`expected a duration such as 10s, 500ms or 2m, got ${JSON.stringify(text)}`);
  const value = Number(match[1]) * UNITS_MS[match[2] as string]!;
  if (value <= 0 || value > 3_600_000) throw new InvalidArgumentError("must be more than 0 and at most 1h");
  return Math.round(value);
}

function parseHostPort(text: string): string {
  const match = /^(\[[0-9a-fA-F:.]+\]|[^:[\]]+):(\d{1,5})$/.exec(text);
  if (match === null || Number(match[2]) > 65535) throw new InvalidArgumentError(`expected HOST:PORT, got ${JSON.stringify(text)}`);
  return text;
}

function parseMode(text: string): number {
  if (!/^0?[0-7]{3}$/.test(text)) throw new InvalidArgumentError(`expected an octal mode such as 0660, got ${JSON.stringify(text)}`);
  return Number.parseInt(text, 8);
}

/** HOST:PORT (HOST may be a bracketed IPv6 address), already checked by the flag parser. */
export function splitHostPort(hostPort: string): { host: string; port: number } {
  const at = hostPort.lastIndexOf(":");
  return { host: hostPort.slice(0, at).replace(/^\[|\]$/g, ""), port: Number(hostPort.slice(at + 1)) };
}

/** Is the HOST of HOST:PORT a loopback address (where plaintext is acceptable)? */
export function isLoopbackListen(listen: string): boolean {
  const { host } = splitHostPort(listen);
  if (host === "localhost") return true;
  if (net.isIPv4(host)) return host.startsWith("127.");
  return host === "::1";
}

function parseAllowDevices(list: string | undefined, sysfsRoot: string, usage: string): DeviceAllowList | undefined {
  if (list === undefined) return undefined;
  try {
    return DeviceAllowList.parse(list, sysfsRoot);
  } catch (err) {
    throw new UsageError((err as Error).message, usage);
  }
}

function buildCommand(): Command {
  const option = (flags: string, description: string) => {
    const name = flags.split(" ")[0]!.replace(/^--/, "");
    return new Option(flags, description).env(`VFIOD_${name.toUpperCase().replaceAll("-", "_")}`);
  };
  return new Command("vfiod")
    .description("gRPC service that hot-plugs VFIO PCI passthrough devices into running VMs")
    .addOption(option("--listen <host:port>", "gRPC over TCP").default("127.0.0.1:50051").argParser(parseHostPort))
    .addOption(option("--socket <path>", "also serve gRPC on this Unix socket"))
    .addOption(option("--socket-mode <mode>", "permissions of the Unix socket").default(0o660, "0660").argParser(parseMode))
    .addOption(option("--socket-group <group>", "group (name or gid) owning the Unix socket"))
    .addOption(option("--inventory <file>", "static VM inventory JSON (re-read when it changes)"))
    .addOption(option("--cocoon-root <dir>", "cocoon's root dir, read-only").default("/var/lib/cocoon"))
    .addOption(option("--sysfs-root <dir>", "where sys/bus/pci and sys/kernel/iommu_groups are read").default("/"))
    .addOption(
      option("--detach-timeout <duration>", "how long Detach waits for the guest to release a device")
        .default(10_000, "10s")
        .argParser(parseDuration),
    )
    .addOption(option("--tls-cert <file>", "server certificate (PEM); enables TLS"))
    .addOption(option("--tls-key <file>", "server private key (PEM)"))
    .addOption(option("--tls-client-ca <file>", "CA (PEM) client certificates must chain to (mTLS)"))
    .addOption(option("--insecure", "allow plaintext gRPC on a non-loopback address"))
    .addOption(option("--allow-client <names>", "comma-separated client certificate CNs or DNS SANs allowed to call (needs mTLS)"))
    .addOption(option("--allow-devices <list>", "comma-separated vendor:device (hex, * wildcard) or BDF; others are refused"))
    .addOption(option("--audit-log <file>", "append one JSON line per Attach/Detach; - for stderr"))
    .addOption(option("--metrics-listen <host:port>", "serve Prometheus metrics on /metrics").argParser(parseHostPort))
    .addOption(option("--log-level <level>", "trace, debug, info, warn, error").default("info"))
    .helpOption("-h, --help", "show this help")
    .exitOverride()
    .configureOutput({ writeOut: () => {}, writeErr: () => {} });
}

/** Parses argv (without node and script) plus VFIOD_* variables. */
export function parseConfig(argv: string[], env: NodeJS.ProcessEnv = process.env): Config {
  const command = buildCommand();
  const usage = command.helpInformation();
  const savedEnv = process.env;
  process.env = env; // commander reads options' env from process.env
  try {
    command.parse(argv, { from: "user" });
  } catch (err) {
    if (err instanceof CommanderError && err.code === "commander.helpDisplayed") throw new UsageError("", usage);
    throw new UsageError(err instanceof Error ? err.message : String(err), usage);
  } finally {
    process.env = savedEnv;
  }
  const o = command.opts();
  const config: Config = {
    listen: o.listen,
    socket: o.socket,
    socketMode: o.socketMode,
    socketGroup: o.socketGroup,
    inventory: o.inventory,
    cocoonRoot: o.cocoonRoot,
    sysfsRoot: o.sysfsRoot,
    detachTimeoutMs: o.detachTimeout,
    tlsCert: o.tlsCert,
    tlsKey: o.tlsKey,
    tlsClientCa: o.tlsClientCa,
    insecure: o.insecure === true || o.insecure === "true" || o.insecure === "1",
    allowClients:
      o.allowClient === undefined
        ? undefined
        : new Set((o.allowClient as string).split(",").map((name) => name.trim()).filter((name) => name !== "")),
    allowDevices: parseAllowDevices(o.allowDevices, o.sysfsRoot, usage),
    auditLog: o.auditLog,
    metricsListen: o.metricsListen,
    logLevel: o.logLevel,
  };
  if (config.allowClients !== undefined && config.tlsClientCa === undefined) {
    throw new UsageError("--allow-client needs mTLS: give --tls-client-ca too", usage);
  }
  if ((config.tlsCert === undefined) !== (config.tlsKey === undefined)) {
    throw new UsageError("--tls-cert and --tls-key go together", usage);
  }
  if (config.tlsClientCa !== undefined && config.tlsCert === undefined) {
    throw new UsageError("--tls-client-ca needs --tls-cert and --tls-key", usage);
  }
  if (config.tlsCert === undefined && !config.insecure && !isLoopbackListen(config.listen)) {
    throw new UsageError(
      `refusing plaintext gRPC on non-loopback ${config.listen}: give --tls-cert/--tls-key, or --insecure`,
      usage,
    );
  }
  return config;
}
