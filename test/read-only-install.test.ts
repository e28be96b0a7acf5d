// vfiod starts and serves from a read-only install (a package under /usr/lib, a container with
// readOnlyRootFilesystem): the built server writes nothing beside itself, and neither does
// `npm start`. The install is what deploy/Containerfile ships: INSTALL_PARTS and node_modules.
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { checkHealth } from "./support/grpc-clients";
import { commandRuns } from "./support/skip";
import { INSTALL_PARTS, startVfiod, type VfiodProcess } from "./support/vfiod-process";

const CHECKOUT = path.resolve(__dirname, "..");
/** The real directory behind the checkout's node_modules (a worktree's may be a symlink). */
const NODE_MODULES = fs.realpathSync(path.join(CHECKOUT, "node_modules"));

let dir: string;
let vfiod: VfiodProcess | undefined;

beforeEach(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "vfiod-ro-"));
});
afterEach(async () => {
  if (vfiod !== undefined) {
    await vfiod.stop();
    // Each command runs in its own process group (setsid): whatever outlived the stop (a
    // server npm did not pass SIGTERM on to) goes with it.
    try {
      process.kill(-vfiod.child.pid!, "SIGKILL");
    } catch {
      // the group is gone: nothing outlived the stop
    }
  }
  vfiod = undefined;
  setWritable(dir, true);
  fs.rmSync(dir, { recursive: true, force: true });
});

/** Copies the built server into `<dir>/vfiod`, without node_modules. */
function copyInstall(): string {
  const install = path.join(dir, "vfiod");
  for (const part of INSTALL_PARTS) {
    fs.cpSync(path.join(CHECKOUT, part), path.join(install, part), { recursive: true });
  }
  return install;
}

/** chmod -R a-w (or u+w back), never following a symlink out of the tree. */
function setWritable(at: string, writable: boolean): void {
  const stat = fs.lstatSync(at);
  if (stat.isSymbolicLink()) return;
  fs.chmodSync(at, writable ? stat.mode | 0o200 : stat.mode & ~0o222);
  if (stat.isDirectory()) for (const name of fs.readdirSync(at)) setWritable(path.join(at, name), writable);
}

/**
 * Starts `command` (vfiod on the copy) in a new session, checks it serves and answers health,
 * and prints how long that took.
 */
async function startServing(variant: string, command: string[]): Promise<VfiodProcess> {
  vfiod = await startVfiod(["--cocoon-root", path.join(dir, "cocoon")], { npm_config_update_notifier: "false" }, { command: ["setsid", ...command] });
  const spawnToServing = vfiod.servingAfterMs;
  const healthStarted = performance.now();
  expect(await checkHealth(vfiod.address, "")).toBe("SERVING");
  console.log(
    `read-only install (${variant}): ${spawnToServing.toFixed(0)} ms from spawn to "vfiod serving", ` +
      `then ${(performance.now() - healthStarted).toFixed(0)} ms for a health check (the test's own client included)`,
  );
  return vfiod;
}

test("serves from a copy nobody may write to (chmod -R a-w; root ignores modes, see the mount tests)", async () => {
  const install = copyInstall();
  fs.symlinkSync(NODE_MODULES, path.join(install, "node_modules"));
  setWritable(install, false);
  await startServing("chmod a-w", [process.execPath, path.join(install, "dist/src/main.js")]);
});

// A read-only bind mount in a private mount namespace (unshare): gone with the process, so a
// failed test leaves no mount behind. It needs CAP_SYS_ADMIN: root outside a locked-down container.
const canMount = commandRuns(
  "unshare",
  ["--mount", "true"],
  "the read-only mount tests (unshare --mount needs root with CAP_SYS_ADMIN)",
);
const mountTest = canMount ? test : test.skip;

/**
 * `command` run on a read-only bind mount of a fresh copy of the install, with node_modules
 * mounted read-only inside it. Before running `command`, the wrapper proves both mounts refuse
 * writes.
 */
function onReadOnlyMount(command: (install: string) => string[]): string[] {
  const install = copyInstall();
  fs.mkdirSync(path.join(install, "node_modules"));
  const wrapper = [
    'install=$1; modules=$2; shift 2',
    'mount --bind -o ro "$install" "$install"',
    'mount --bind -o ro "$modules" "$install/node_modules"',
    'for probe in "$install/probe" "$install/node_modules/probe"; do',
    '  if touch "$probe" 2>/dev/null; then echo "$probe is writable: the mount is not read-only" >&2; exit 97; fi',
    "done",
    'exec "$@"',
  ].join("\n");
  return ["unshare", "--mount", "--propagation", "private", "sh", "-euc", wrapper, "sh", install, NODE_MODULES, ...command(install)];
}

mountTest("serves from a read-only bind mount of the install and of node_modules", async () => {
  await startServing("ro bind mount", onReadOnlyMount((install) => [process.execPath, path.join(install, "dist/src/main.js")]));
});

mountTest("npm start serves from the read-only install, and SIGTERM to npm drains vfiod", async () => {
  const started = await startServing("ro bind mount, npm start", onReadOnlyMount((install) => ["npm", "--prefix", install, "start", "--"]));
  expect(await started.stop()).toBe(0);
  expect(started.logs.map((l) => l.msg)).toContain("vfiod stopped");
});
