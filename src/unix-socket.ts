// The --socket listener: refuse to take over a socket another process serves,
// and never let the socket exist with wider permissions than asked. It is bound
// inside a private directory (mode 0700) beside the target, given its mode and
// group there, then renamed into place: at no moment can anyone else connect to
// it under looser permissions.
import fs from "node:fs";
import net from "node:net";
import path from "node:path";

/** Whether something accepts connections on the Unix socket at `socketPath`. */
function answers(socketPath: string): Promise<boolean> {
  return new Promise((resolve) => {
    const probe = net.connect(socketPath);
    probe.once("connect", () => {
      probe.destroy();
      resolve(true);
    });
    probe.once("error", () => resolve(false));
  });
}

/**
 * Removes a socket file a killed vfiod left behind, so bind can take the path.
 * @throws Error when another process serves on it, or the path is not a socket.
 */
export async function clearStaleSocket(socketPath: string): Promise<void> {
  let stat: fs.Stats;
  try {
    stat = fs.lstatSync(socketPath);
  } catch {
    return;
  }
  if (!stat.isSocket()) throw new Error(`--socket ${socketPath} exists and is not a socket; refusing to replace it`);
  if (await answers(socketPath)) {
    throw new Error(`--socket ${socketPath}: another process is serving on it (another vfiod?); refusing to start`);
  }
  fs.unlinkSync(socketPath);
}

/**
 * Binds a Unix socket at `socketPath` with exactly `mode` (and `gid`) from the
 * moment it is reachable: `bind` is called with a path in a private directory.
 */
export async function bindPrivately(
  socketPath: string,
  mode: number,
  gid: number | undefined,
  bind: (privatePath: string) => Promise<void>,
): Promise<void> {
  await clearStaleSocket(socketPath);
  const dir = fs.mkdtempSync(path.join(path.dirname(socketPath), ".vfiod-bind-"));
  try {
    const privatePath = path.join(dir, "sock");
    await bind(privatePath);
    fs.chmodSync(privatePath, mode);
    if (gid !== undefined) fs.chownSync(privatePath, -1, gid);
    fs.renameSync(privatePath, socketPath);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}
