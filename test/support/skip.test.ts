// The one rule for tests that lack something on this machine: skip, saying why,
// except in CI (CI=true), where the run must fail instead.
import { commandRuns, inCi, skipOutsideCi } from "./skip";

describe("skipOutsideCi", () => {
  const saved = process.env.CI;
  let warn: jest.SpyInstance;
  beforeEach(() => {
    warn = jest.spyOn(console, "warn").mockImplementation(() => undefined);
  });
  afterEach(() => {
    warn.mockRestore();
    if (saved === undefined) delete process.env.CI;
    else process.env.CI = saved;
  });

  test.each([undefined, "", "false", "1"])("outside CI (CI=%j) logs why and returns skip", (ci) => {
    if (ci === undefined) delete process.env.CI;
    else process.env.CI = ci;
    expect(inCi()).toBe(false);
    expect(skipOutsideCi("real-QEMU tests", "qemu-system-x86_64 --version failed (ENOENT)")).toBe("skip");
    expect(warn).toHaveBeenCalledWith("skipping real-QEMU tests: qemu-system-x86_64 --version failed (ENOENT)");
  });

  test("in CI (CI=true) throws naming what is missing, and logs no skip", () => {
    process.env.CI = "true";
    expect(inCi()).toBe(true);
    expect(() => skipOutsideCi("TLS tests", "the openssl CLI does not run")).toThrow(
      "TLS tests cannot run: the openssl CLI does not run; in CI (CI=true) that is a failure, not a skip",
    );
    expect(warn).not.toHaveBeenCalled();
  });
});

describe("commandRuns", () => {
  const saved = process.env.CI;
  afterEach(() => {
    if (saved === undefined) delete process.env.CI;
    else process.env.CI = saved;
  });

  test("a command that runs is true, in CI or not", () => {
    process.env.CI = "true";
    expect(commandRuns(process.execPath, ["--version"], "node tests")).toBe(true);
  });

  test("a missing command skips outside CI and fails in CI, naming it", () => {
    const warn = jest.spyOn(console, "warn").mockImplementation(() => undefined);
    try {
      delete process.env.CI;
      expect(commandRuns("vfiod-no-such-command", ["--version"], "some tests")).toBe(false);
      expect(warn).toHaveBeenCalledWith(expect.stringMatching(/^skipping some tests: vfiod-no-such-command --version failed \(.*ENOENT\)$/));
      process.env.CI = "true";
      expect(() => commandRuns("vfiod-no-such-command", ["--version"], "some tests")).toThrow(
        /^some tests cannot run: vfiod-no-such-command --version failed .*; in CI \(CI=true\) that is a failure, not a skip$/,
      );
    } finally {
      warn.mockRestore();
    }
  });
});
