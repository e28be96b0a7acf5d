import { isLoopbackListen, parseConfig, parseDuration, UsageError } from "../src/config";

function usageError(argv: string[], env: NodeJS.ProcessEnv = {}): UsageError {
  try {
    parseConfig(argv, env);
  } catch (err) {
    if (err instanceof UsageError) return err;
    throw err;
  }
  throw new Error(`accepted ${argv.join(" ")}`);
}

test("defaults are the contract's", () => {
  expect(parseConfig([], {})).toMatchObject({
    listen: "127.0.0.1:50051",
    socket: undefined,
    socketMode: 0o660,
    cocoonRoot: "/var/lib/cocoon",
    sysfsRoot: "/",
    detachTimeoutMs: 10_000,
    insecure: false,
  });
});

test("flags are read", () => {
  const config = parseConfig(
    ["--listen", "[::1]:7000", "--socket", "/run/vfiod.sock", "--socket-mode", "0600", "--inventory", "/etc/vfiod/vms.json",
      "--cocoon-root", "/srv/cocoon", "--sysfs-root", "/fake", "--detach-timeout", "1.5s"],
    {},
  );
  expect(config).toMatchObject({
    listen: "[::1]:7000",
    socket: "/run/vfiod.sock",
    socketMode: 0o600,
    inventory: "/etc/vfiod/vms.json",
    cocoonRoot: "/srv/cocoon",
    sysfsRoot: "/fake",
    detachTimeoutMs: 1500,
  });
});

test("every flag also comes from VFIOD_<FLAG>; a flag beats its variable", () => {
  const env = { VFIOD_LISTEN: "127.0.0.1:6000", VFIOD_DETACH_TIMEOUT: "250ms", VFIOD_SYSFS_ROOT: "/x", VFIOD_INSECURE: "1" };
  expect(parseConfig([], env)).toMatchObject({ listen: "127.0.0.1:6000", detachTimeoutMs: 250, sysfsRoot: "/x", insecure: true });
  expect(parseConfig(["--listen", "127.0.0.1:7000"], env).listen).toBe("127.0.0.1:7000");
});

test.each([
  [["--bogus"], "unknown option"],
  [["--listen", "nonsense"], "HOST:PORT"],
  [["--listen", "127.0.0.1:99999"], "HOST:PORT"],
  [["--detach-timeout", "10"], "duration"],
  [["--detach-timeout", "0s"], "more than 0"],
  [["--socket-mode", "999"], "octal"],
  [["--tls-cert", "a.pem"], "go together"],
  [["--tls-client-ca", "ca.pem"], "needs --tls-cert"],
  [["stray"], "too many arguments"],
  [["--listen", "0.0.0.0:50051"], "refusing plaintext"],
])("bad flags %j are a usage error", (argv, message) => {
  const err = usageError(argv);
  expect(err.message).toContain(message);
  expect(err.usage).toContain("--detach-timeout");
});

test("plaintext on a non-loopback address needs --insecure or TLS", () => {
  expect(parseConfig(["--listen", "0.0.0.0:50051", "--insecure"], {}).insecure).toBe(true);
  expect(parseConfig(["--listen", "0.0.0.0:50051", "--tls-cert", "c", "--tls-key", "k"], {}).tlsCert).toBe("c");
});

test.each([
  ["127.0.0.1:1", true],
  ["127.8.9.10:1", true],
  ["localhost:1", true],
  ["[::1]:1", true],
  ["0.0.0.0:1", false],
  ["10.0.0.1:1", false],
  ["[::]:1", false],
  ["example.com:1", false],
])("isLoopbackListen(%j) is %j", (listen, expected) => {
  expect(isLoopbackListen(listen)).toBe(expected);
});

test.each([
  ["10s", 10_000],
  ["500ms", 500],
  ["2m", 120_000],
  ["1h", 3_600_000],
])("parseDuration(%j) = %j", (text, ms) => {
  expect(parseDuration(text)).toBe(ms);
});

test("every flag's default, including those the contract leaves to vfiod", () => {
  expect(parseConfig([], {})).toMatchObject({
    procRoot: "/proc",
    cocoonBinaries: { cloudHypervisor: "cloud-hypervisor", firecracker: "firecracker" },
    hypervisorTimeoutMs: 30_000,
    refreshIntervalMs: 30_000,
    socketGroup: undefined,
    inventory: undefined,
    auditLog: undefined,
    metricsListen: undefined,
    logLevel: "info",
  });
});

describe("boolean variables are read strictly (issue 8 item 1)", () => {
  test("VFIOD_INSECURE=false does not allow plaintext off the loopback", () => {
    const err = usageError(["--listen", "0.0.0.0:50051"], { VFIOD_INSECURE: "false" });
    expect(err.message).toContain("refusing plaintext");
    expect(err.usage).toContain("--insecure");
  });

  test.each(["1", "true", "TRUE", "yes", "Yes", "on", "ON", " on "])("VFIOD_INSECURE=%j is true", (value) => {
    expect(parseConfig(["--listen", "0.0.0.0:50051"], { VFIOD_INSECURE: value }).insecure).toBe(true);
  });

  test.each(["0", "false", "False", "no", "NO", "off", "Off", ""])("VFIOD_INSECURE=%j is false", (value) => {
    expect(parseConfig([], { VFIOD_INSECURE: value }).insecure).toBe(false);
  });

  test.each(["maybe", "2", "enabled", "y", "t", "-1"])("VFIOD_INSECURE=%j is a usage error naming the variable", (value) => {
    const err = usageError([], { VFIOD_INSECURE: value });
    expect(err.message).toContain("VFIOD_INSECURE");
    expect(err.message).toContain("expected 1/true/yes/on or 0/false/no/off");
    expect(err.usage).toContain("--detach-timeout");
  });

  test("--insecure on the command line wins over VFIOD_INSECURE=0", () => {
    expect(parseConfig(["--insecure", "--listen", "0.0.0.0:1"], { VFIOD_INSECURE: "0" }).insecure).toBe(true);
  });
});

test.each([
  [{ VFIOD_DETACH_TIMEOUT: "abc" }, "duration"],
  [{ VFIOD_DETACH_TIMEOUT: "10" }, "duration"],
  [{ VFIOD_SOCKET_MODE: "999" }, "octal"],
  [{ VFIOD_HYPERVISOR_TIMEOUT: "0s" }, "more than 0"],
  [{ VFIOD_HYPERVISOR_TIMEOUT: "2h" }, "at most 1h"],
  [{ VFIOD_REFRESH_INTERVAL: "often" }, "duration"],
  [{ VFIOD_LOG_LEVEL: "loud" }, "loud"],
  [{ VFIOD_LISTEN: "nonsense" }, "HOST:PORT"],
  [{ VFIOD_METRICS_LISTEN: "9100" }, "HOST:PORT"],
])("a bad value in %j is a usage error like the flag's", (env, message) => {
  const err = usageError([], env);
  expect(err.message).toContain(message);
  expect(err.usage).toContain("--detach-timeout");
});

describe("--listen none: the Unix socket alone (issue 8 item 2)", () => {
  test.each([
    [["--listen", "none", "--socket", "/run/vfiod.sock"], {}],
    [["--listen", "", "--socket", "/run/vfiod.sock"], {}],
    [[], { VFIOD_LISTEN: "none", VFIOD_SOCKET: "/run/vfiod.sock" }],
    [[], { VFIOD_LISTEN: "", VFIOD_SOCKET: "/run/vfiod.sock" }],
  ])("%j %j: no TCP listener", (argv, env) => {
    expect(parseConfig(argv, env)).toMatchObject({ listen: undefined, socket: "/run/vfiod.sock" });
  });

  test.each([[["--listen", "none"]], [["--listen", ""]]])("%j without --socket serves nowhere: a usage error", (argv) => {
    expect(usageError(argv).message).toContain("--listen none needs --socket");
  });

  test("no TCP listener means no plaintext-off-loopback question", () => {
    expect(parseConfig(["--listen", "none", "--socket", "/s"], {}).insecure).toBe(false);
  });
});

describe("metrics off the loopback need --insecure (issue 8 item 4)", () => {
  test("--metrics-listen 0.0.0.0:9100 without --insecure is a usage error", () => {
    const err = usageError(["--metrics-listen", "0.0.0.0:9100"]);
    expect(err.message).toContain("refusing plaintext metrics on non-loopback 0.0.0.0:9100");
  });

  test.each([
    [["--metrics-listen", "0.0.0.0:9100", "--insecure"], {}],
    [["--metrics-listen", "0.0.0.0:9100"], { VFIOD_INSECURE: "yes" }],
    [["--metrics-listen", "127.0.0.1:9100"], {}],
    [["--metrics-listen", "[::1]:9100"], {}],
  ])("%j %j is accepted", (argv, env) => {
    expect(parseConfig(argv, env).metricsListen).toBe(argv[1]);
  });

  test("VFIOD_INSECURE=off does not open metrics off the loopback", () => {
    expect(usageError(["--metrics-listen", "0.0.0.0:9100"], { VFIOD_INSECURE: "off" }).message).toContain("refusing plaintext metrics");
  });
});

describe("--manage-binding is opt-in and needs --allow-devices (issue 11 item 1)", () => {
  test("off by default; --state-dir defaults to /run/vfiod", () => {
    expect(parseConfig([], {})).toMatchObject({ manageBinding: false, stateDir: "/run/vfiod" });
  });

  test.each([
    [["--manage-binding"], {}],
    [[], { VFIOD_MANAGE_BINDING: "1" }],
    [[], { VFIOD_MANAGE_BINDING: "yes", VFIOD_STATE_DIR: "/var/run/x" }],
  ])("%j %j without --allow-devices is a usage error: vfiod must never take the host's own devices", (argv, env) => {
    const err = usageError(argv, env);
    expect(err.message).toContain("--manage-binding needs --allow-devices");
    expect(err.usage).toContain("--manage-binding");
    expect(err.usage).toContain("--state-dir");
  });

  test("an --allow-devices list of *:* does not count: it names no device", () => {
    expect(usageError(["--manage-binding", "--allow-devices", "8086:10d3,*:*"]).message).toContain("not *:*");
  });

  test("with --allow-devices it is on, and --state-dir / VFIOD_STATE_DIR say where its records go", () => {
    const config = parseConfig(["--manage-binding", "--allow-devices", "8086:*", "--state-dir", "/run/v"], {});
    expect(config).toMatchObject({ manageBinding: true, stateDir: "/run/v" });
    expect(parseConfig([], { VFIOD_MANAGE_BINDING: "on", VFIOD_ALLOW_DEVICES: "01:00.0", VFIOD_STATE_DIR: "/s" })).toMatchObject({
      manageBinding: true,
      stateDir: "/s",
    });
  });

  test.each(["0", "false", "off", ""])("VFIOD_MANAGE_BINDING=%j is off (and needs no allow-list)", (value) => {
    expect(parseConfig([], { VFIOD_MANAGE_BINDING: value }).manageBinding).toBe(false);
  });

  test.each(["maybe", "2", "enabled"])("VFIOD_MANAGE_BINDING=%j is a usage error naming the variable", (value) => {
    expect(usageError([], { VFIOD_MANAGE_BINDING: value }).message).toContain("VFIOD_MANAGE_BINDING");
  });
});
