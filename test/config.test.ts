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
