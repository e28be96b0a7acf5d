// What a hypervisor actually holds, read straight from its socket without any
// vfiod code, so a test can compare vfiod's List with the hypervisor's truth.
// Also: a Unix socket file that refuses connections (a crashed server's leftover).
import fs from "node:fs";
import http from "node:http";
import net from "node:net";
import { listenOn } from "./listen";

/** A VFIO device as a List should report it. */
export interface HeldDevice {
  readonly id: string;
  /** Host BDF, "0000:01:00.0" ("" when the path names none). */
  readonly bdf: string;
  /** Guest BDF, when the hypervisor says ("" otherwise). */
  readonly guestBdf: string;
}

const BDF_AT_END = /([0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7])\/?$/;

function bdfOf(devicePath: unknown): string {
  return typeof devicePath === "string" ? (BDF_AT_END.exec(devicePath)?.[1] ?? "") : "";
}

/**
 * Cloud Hypervisor's `config.devices` (with each device's guest BDF from
 * `device_tree`), by GET /api/v1/vm.info on `socketPath`; [] when no VM exists.
 * Rejects after `timeoutMs` (CH answers one request at a time: a hung one blocks this too).
 */
export function chHolds(socketPath: string, timeoutMs = 10_000): Promise<HeldDevice[]> {
  return new Promise((resolve, reject) => {
    const request = http.get(
      { socketPath, path: "/api/v1/vm.info", agent: false, timeout: timeoutMs, headers: { connection: "close" } },
      (response) => {
        let text = "";
        response.setEncoding("utf8");
        response.on("data", (chunk: string) => (text += chunk));
        response.on("error", reject);
        response.on("end", () => {
          if (response.statusCode === 404 || response.statusCode === 500) return resolve([]);
          if (response.statusCode !== 200) return reject(new Error(`vm.info: HTTP ${response.statusCode}: ${text}`));
          const info = JSON.parse(text) as {
            config: { devices?: { id?: string | null; path?: string | null }[] | null };
            device_tree?: Record<string, { pci_bdf?: string | null }> | null;
          };
          resolve(
            (info.config.devices ?? []).map((d) => ({
              id: d.id ?? "",
              bdf: bdfOf(d.path),
              guestBdf: info.device_tree?.[d.id ?? ""]?.pci_bdf ?? "",
            })),
          );
        });
      },
    );
    request.on("timeout", () => request.destroy(new Error(`vm.info: no answer within ${timeoutMs} ms`)));
    request.on("error", reject);
  });
}

/**
 * The vfio-pci devices a QEMU monitor (or QmpDouble) holds: `qom-list
 * /machine/peripheral`, then `qom-get sysfsdev` of each; sorted by id. One QMP
 * session, closed before resolving (QEMU serves one client at a time).
 */
export async function qmpHolds(socketPath: string, timeoutMs = 10_000): Promise<Omit<HeldDevice, "guestBdf">[]> {
  const socket = net.createConnection(socketPath);
  socket.setEncoding("utf8");
  const replies: ((message: Record<string, unknown>) => void)[] = [];
  let greeted!: () => void;
  const greeting = new Promise<void>((resolve) => (greeted = resolve));
  let buffer = "";
  let failed: (err: Error) => void = () => undefined;
  const failure = new Promise<never>((_, reject) => (failed = reject));
  failure.catch(() => undefined);
  const timer = setTimeout(() => failed(new Error(`QMP: no answer within ${timeoutMs} ms`)), timeoutMs);
  socket.on("error", (err) => failed(err));
  socket.on("close", () => failed(new Error("QMP connection closed")));
  socket.on("data", (chunk: string) => {
    buffer += chunk;
    for (let end = buffer.indexOf("\n"); end >= 0; end = buffer.indexOf("\n")) {
      const line = buffer.slice(0, end).trim();
      buffer = buffer.slice(end + 1);
      if (line === "") continue;
      const message = JSON.parse(line) as Record<string, unknown>;
      if ("QMP" in message) greeted();
      else if ("return" in message || "error" in message) replies.shift()?.(message);
    }
  });
  const run = async (execute: string, args?: Record<string, unknown>): Promise<unknown> => {
    const reply = new Promise<Record<string, unknown>>((resolve) => replies.push(resolve));
    socket.write(JSON.stringify(args === undefined ? { execute } : { execute, arguments: args }));
    const message = await Promise.race([reply, failure]);
    if ("error" in message) throw new Error(`QMP ${execute}: ${JSON.stringify(message.error)}`);
    return message.return;
  };
  try {
    await Promise.race([greeting, failure]);
    await run("qmp_capabilities");
    const children = (await run("qom-list", { path: "/machine/peripheral" })) as { name: string; type: string }[];
    const held: Omit<HeldDevice, "guestBdf">[] = [];
    for (const { name } of children.filter((c) => c.type === "child<vfio-pci>")) {
      const sysfsdev = await run("qom-get", { path: `/machine/peripheral/${name}`, property: "sysfsdev" });
      held.push({ id: name, bdf: bdfOf(sysfsdev) });
    }
    return held.sort((a, b) => a.id.localeCompare(b.id));
  } finally {
    clearTimeout(timer);
    socket.destroy();
  }
}

/**
 * Leaves a Unix socket file at `socketPath` that nobody listens on, as a
 * crashed server does: connecting to it fails with ECONNREFUSED.
 */
export async function refusingSocketFile(socketPath: string): Promise<void> {
  const server = net.createServer();
  const scratch = `${socketPath}.listening`;
  await listenOn(server, scratch);
  // Node unlinks the path it listened on when the server closes: move the file away first.
  fs.renameSync(scratch, socketPath);
  await new Promise<void>((resolve) => server.close(() => resolve()));
  if (!fs.statSync(socketPath).isSocket()) throw new Error(`${socketPath} is not a socket file`);
}
