// vfiod's process flags (../shared/contract.md "Process interface"), each also
// read from VFIOD_<FLAG>. Parsing is pure: it returns a Config or throws UsageError.
import { Command, CommanderError, InvalidArgumentError, Option } from "commander";
import fs from "node:fs";
import net from "node:net";
import { DeviceAllowList } from "./host/device-allow-list";
import { DEFAULT_COCOON_BINARIES, type CocoonBinaries } from "./inventory/cocoon";
import { DEFAULT_HYPERVISOR_TIMEOUT_MS } from "./request-bound";

export interface Config {
  /** HOST:PORT for gRPC over TCP; undefined with `--listen none` (the Unix socket alone). */
  readonly listen: string | undefined;
  /** Optional Unix socket path for gRPC. */
  readonly socket: string | undefined;
  readonly socketMode: number;
  readonly socketGroup: string | undefined;
  readonly inventory: string | undefined;
  readonly cocoonRoot: string;
  readonly cocoonBinaries: CocoonBinaries;
  readonly sysfsRoot: string;
  readonly procRoot: string;
  readonly detachTimeoutMs: number;
  readonly hypervisorTimeoutMs: number;
  readonly refreshIntervalMs: number;
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
  /** --manage-binding: managed Attach may bind a device from its host driver to vfio-pci (needs --allow-devices). */
  readonly manageBinding: boolean;
  /** --state-dir: which driver each managed device had, kept across restarts. */
  readonly stateDir: string;
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

/** `--listen`: HOST:PORT, or "none" / "" for no TCP listener at all. */
function parseListen(text: string): string {
  return text === "" || text === "none" ? "none" : parseHostPort(text);
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

/** Accepted spellings of a boolean in VFIOD_* variables; anything else is a usage error, never "on". */
const TRUE_WORDS = new Set(["1", "true", "yes", "on"]);
const FALSE_WORDS = new Set(["0", "false", "no", "off", ""]);

/**
 * A boolean flag: true when given on the command line, else its VFIOD_* variable
 * read strictly (commander would take any defined value, "false" included, as true).
 */
function booleanFlag(command: Command, name: string, env: NodeJS.ProcessEnv, usage: string): boolean {
  const key = name.replace(/-([a-z])/g, (_, letter: string) => letter.toUpperCase()); // commander's key: manageBinding
  if (command.getOptionValueSource(key) === "cli") return true;
  const variable = envName(name);
  const value = env[variable];
  if (value === undefined) return false;
  const word = value.trim().toLowerCase();
  if (TRUE_WORDS.has(word)) return true;
  if (FALSE_WORDS.has(word)) return false;
  throw new UsageError(`${variable}=${JSON.stringify(value)}: expected 1/true/yes/on or 0/false/no/off`, usage);
}

/** The variable a flag is also read from: --detach-timeout -> VFIOD_DETACH_TIMEOUT. */
function envName(flag: string): string {
  return `VFIOD_${flag.toUpperCase().replaceAll("-", "_")}`;
}

const LOG_LEVELS = ["trace", "debug", "info", "warn", "error", "fatal", "silent"];

function parseAllowDevices(list: string | undefined, sysfsRoot: string, usage: string): DeviceAllowList | undefined {
  if (list === undefined) return undefined;
  try {
    return DeviceAllowList.parse(list, sysfsRoot);
  } catch (err) {
    throw new UsageError((err as Error).message, usage);
  }
}

function buildCommand(): Command {
  const option = (flags: string, description: string) =>
    new Option(flags, description).env(envName(flags.split(" ")[0]!.replace(/^--/, "")));
  const duration = (flags: string, description: string, ms: number, shown: string) =>
    option(flags, description).default(ms, shown).argParser(parseDuration);
  return new Command("vfiod")
    .description("gRPC service that hot-plugs VFIO PCI passthrough devices into running VMs")
    .addOption(
      option("--listen <host:port>", 'gRPC over TCP; "none" (or empty) serves the Unix socket alone')
        .default("127.0.0.1:50051")
        .argParser(parseListen),
    )
    .addOption(option("--socket <path>", "also serve gRPC on this Unix socket"))
    .addOption(option("--socket-mode <mode>", "permissions of the Unix socket").default(0o660, "0660").argParser(parseMode))
    .addOption(option("--socket-group <group>", "group (name or gid) owning the Unix socket"))
    .addOption(option("--inventory <file>", "static VM inventory JSON (re-read when it changes)"))
    .addOption(option("--cocoon-root <dir>", "cocoon's root dir, read-only").default("/var/lib/cocoon"))
    .addOption(option("--cocoon-ch-binary <name>", "cocoon's ch_binary: its Cloud Hypervisor binary").default(DEFAULT_COCOON_BINARIES.cloudHypervisor))
    .addOption(option("--cocoon-fc-binary <name>", "cocoon's fc_binary: its Firecracker binary").default(DEFAULT_COCOON_BINARIES.firecracker))
    .addOption(option("--sysfs-root <dir>", "where sys/bus/pci, sys/kernel/iommu_groups and dev/vfio are read").default("/"))
    .addOption(option("--proc-root <dir>", "where /proc is read (who holds a device's VFIO group open)").default("/proc"))
    .addOption(duration("--detach-timeout <duration>", "how long Detach waits for the guest to release a device", 10_000, "10s"))
    .addOption(
      duration(
        "--hypervisor-timeout <duration>",
        "bound on each hypervisor request when the caller gave no earlier deadline, and on waiting for cocoon's ops.lock",
        DEFAULT_HYPERVISOR_TIMEOUT_MS,
        `${DEFAULT_HYPERVISOR_TIMEOUT_MS / 1000}s`,
      ),
    )
    .addOption(duration("--refresh-interval <duration>", "how often vfiod re-reads what every VM holds, in the background", 30_000, "30s"))
    .addOption(option("--tls-cert <file>", "server certificate (PEM); enables TLS"))
    .addOption(option("--tls-key <file>", "server private key (PEM)"))
    .addOption(option("--tls-client-ca <file>", "CA (PEM) client certificates must chain to (mTLS)"))
    // Booleans are read from VFIOD_* by booleanFlag, strictly: commander takes any defined value as true.
    .addOption(new Option("--insecure", "allow plaintext gRPC (and metrics) on a non-loopback address; also VFIOD_INSECURE=1"))
    .addOption(option("--allow-client <names>", "comma-separated client certificate CNs or DNS SANs allowed to call (needs mTLS)"))
    .addOption(option("--allow-devices <list>", "comma-separated vendor:device (hex, * wildcard) or BDF; others are refused"))
    .addOption(option("--audit-log <file>", "append one JSON line per Attach/Detach; - for stderr"))
    .addOption(
      option("--metrics-listen <host:port>", "serve Prometheus metrics on /metrics (a non-loopback address needs --insecure)").argParser(
        parseHostPort,
      ),
    )
    .addOption(option("--log-level <level>", "log level").choices(LOG_LEVELS).default("info"))
    .addOption(
      new Option(
        "--manage-binding",
        "let a managed Attach bind a device from its host driver to vfio-pci and restore it on Detach (needs --allow-devices); also VFIOD_MANAGE_BINDING=1",
      ),
    )
    .addOption(option("--state-dir <dir>", "where managed binding keeps which driver each device had (tmpfs)").default("/run/vfiod"))
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
    listen: o.listen === "none" ? undefined : o.listen,
    socket: o.socket,
    socketMode: o.socketMode,
    socketGroup: o.socketGroup,
    inventory: o.inventory,
    cocoonRoot: o.cocoonRoot,
    cocoonBinaries: { cloudHypervisor: o.cocoonChBinary, firecracker: o.cocoonFcBinary },
    sysfsRoot: o.sysfsRoot,
    procRoot: o.procRoot,
    detachTimeoutMs: o.detachTimeout,
    hypervisorTimeoutMs: o.hypervisorTimeout,
    refreshIntervalMs: o.refreshInterval,
    tlsCert: o.tlsCert,
    tlsKey: o.tlsKey,
    tlsClientCa: o.tlsClientCa,
    insecure: booleanFlag(command, "insecure", env, usage),
    allowClients:
      o.allowClient === undefined
        ? undefined
        : new Set((o.allowClient as string).split(",").map((name) => name.trim()).filter((name) => name !== "")),
    allowDevices: parseAllowDevices(o.allowDevices, o.sysfsRoot, usage),
    auditLog: o.auditLog,
    metricsListen: o.metricsListen,
    logLevel: o.logLevel,
    manageBinding: booleanFlag(command, "manage-binding", env, usage),
    stateDir: o.stateDir,
  };
  if (config.listen === undefined && config.socket === undefined) {
    throw new UsageError("--listen none needs --socket: vfiod would serve nowhere", usage);
  }
  if (config.allowClients !== undefined && config.tlsClientCa === undefined) {
    throw new UsageError("--allow-client needs mTLS: give --tls-client-ca too", usage);
  }
  if ((config.tlsCert === undefined) !== (config.tlsKey === undefined)) {
    throw new UsageError("--tls-cert and --tls-key go together", usage);
  }
  if (config.tlsClientCa !== undefined && config.tlsCert === undefined) {
    throw new UsageError("--tls-client-ca needs --tls-cert and --tls-key", usage);
  }
  if (config.listen !== undefined && config.tlsCert === undefined && !config.insecure && !isLoopbackListen(config.listen)) {
    throw new UsageError(
      `refusing plaintext gRPC on non-loopback ${config.listen}: give --tls-cert/--tls-key, or --insecure`,
      usage,
    );
  }
  // Metrics name VMs and devices and are never behind TLS: off the loopback only on purpose.
  if (config.metricsListen !== undefined && !config.insecure && !isLoopbackListen(config.metricsListen)) {
    throw new UsageError(
      `refusing plaintext metrics on non-loopback ${config.metricsListen}: use a loopback address, or --insecure`,
      usage,
    );
  }
  // Managed binding takes devices from host drivers: only ones the operator listed, never "any".
  if (config.manageBinding && config.allowDevices === undefined) {
    throw new UsageError(
      "--manage-binding needs --allow-devices: vfiod must never take the host's own disks or NICs from their drivers",
      usage,
    );
  }
  if (config.manageBinding && config.allowDevices?.allowsAnyDevice()) {
    throw new UsageError("--manage-binding needs an --allow-devices list that names devices, not *:*", usage);
  }
  return config;
}

/**
 * --socket-group as a gid: a number, or a name looked up in `groupFile` (Node has
 * no getgrnam). Read when vfiod starts, not when flags are parsed: a unit's group
 * exists only on the host it runs on.
 * @throws UsageError for a name the file lacks: the socket's access must not be guessed.
 */
export function socketGroupId(group: string, groupFile = "/etc/group"): number {
  if (/^\d+$/.test(group)) return Number(group);
  for (const line of fs.readFileSync(groupFile, "utf8").split("\n")) {
    const [name, , gid] = line.split(":");
    if (name === group && gid !== undefined && /^\d+$/.test(gid)) return Number(gid);
  }
  const why = `--socket-group: no group named ${JSON.stringify(group)} in ${groupFile}`;
  throw new UsageError(why, buildCommand().helpInformation());
}
