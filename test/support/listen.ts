// Where the test doubles listen: a Unix socket, bound before they are used.
import type net from "node:net";

/** Resolves once `server` listens on the Unix socket `socketPath`; rejects when it cannot bind. */
export function listenOn(server: net.Server, socketPath: string): Promise<void> {
  return new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(socketPath, resolve);
  });
}
