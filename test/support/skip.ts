// What a test does when this machine lacks something it needs (QEMU, openssl, flock,
// ../shared, root, the Debian archive). Outside CI it skips, saying why. In CI
// (CI=true) a green run must mean the whole suite ran, so it fails instead.
import { spawnSync } from "node:child_process";

/** Whether this is a CI run (`CI=true`), where nothing may be skipped for want of a tool. */
export function inCi(): boolean {
  return process.env.CI === "true";
}

/**
 * `tests` cannot run because `missing` is absent. Outside CI: logs why and returns "skip".
 * @throws Error naming what is missing, in CI.
 */
export function skipOutsideCi(tests: string, missing: string): "skip" {
  if (inCi()) throw new Error(`${tests} cannot run: ${missing}; in CI (CI=true) that is a failure, not a skip`);
  console.warn(`skipping ${tests}: ${missing}`);
  return "skip";
}

/**
 * Whether `command args` runs here (exits 0); when not, skipOutsideCi says why.
 * @throws in CI when it does not.
 */
export function commandRuns(command: string, args: readonly string[], tests: string): boolean {
  const probe = spawnSync(command, args, { encoding: "utf8" });
  if (probe.error === undefined && probe.status === 0) return true;
  skipOutsideCi(tests, `${[command, ...args].join(" ")} failed (${probe.error?.message ?? probe.stderr.trim()})`);
  return false;
}
