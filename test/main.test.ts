// The vfiod process: flags, exit codes, serving, and draining on SIGTERM.
import * as grpc from "@grpc/grpc-js";
import { spawn, spawnSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { createDeviceClient, errorReason } from "../src/grpc/client";
import { ChDouble } from "./support/ch-double";
import { checkHealth } from "./support/grpc-clients";
import { MAIN_JS, runVfiodToExit, startVfiod, type VfiodProcess } from "./support/vfiod-process";
import { waitFor } from "./support/wait";

let dir: string;
let vfiod: VfiodProcess | undefined;

beforeEach(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "vfiod-main-"));
});
afterEach(async () => {
  await vfiod?.stop();
  vfiod = undefined;
  fs.rmSync(dir, { recursive: true, force: true });
});

test.each([
  [["--bogus"], "unknown option"],
  [["--detach-timeout", "soon"], "duration"],
  [["--listen", "0.0.0.0:50051"], "refusing plaintext"],
])("bad flags %j exit 2 with the reason and usage", (args, reason) => {
  const run = spawnSync(process.execPath, [MAIN_JS, ...args], { encoding: "utf8", timeout: 15_000 });
  expect(run.status).toBe(2);
  expect(run.stderr).toContain(reason);
  expect(run.stderr).toContain("Usage: vfiod");
});

test("--help prints usage and exits 0", () => {
  const run = spawnSync(process.execPath, [MAIN_JS, "--help"], { encoding: "utf8", timeout: 15_000 });
  expect(run.status).toBe(0);
  expect(run.stdout).toContain("--inventory");
});

test("serves health on TCP and on a Unix socket with the requested mode; VFIOD_* variables work", async () => {
  const socket = path.join(dir, "vfiod.sock");
  vfiod = await startVfiod(["--cocoon-root", dir], { VFIOD_SOCKET: socket, VFIOD_SOCKET_MODE: "0600" });
  expect(await checkHealth(vfiod.address, "vfiod.v1.DeviceService")).toBe("SERVING");
  expect(await checkHealth(`unix:${socket}`, "")).toBe("SERVING");
  expect(fs.statSync(socket).mode & 0o777).toBe(0o600);
  expect(await vfiod.stop()).toBe(0);
  expect(fs.existsSync(socket)).toBe(false);
});

test("an inventory written after start is picked up without a restart", async () => {
  const inventory = path.join(dir, "inventory.json");
  const ch = await ChDouble.start(path.join(dir, "ch.sock"));
  ch.setState("Running");
  vfiod = await startVfiod(["--inventory", inventory, "--cocoon-root", dir]);
  const client = createDeviceClient(vfiod.address);
  try {
    await expect(client.list({ vm: "late" })).rejects.toMatchObject({ code: grpc.status.NOT_FOUND });
    fs.writeFileSync(inventory, JSON.stringify({ vms: [{ name: "late", hypervisor: "cloud-hypervisor", socket: path.join(dir, "ch.sock") }] }));
    expect((await client.list({ vm: "late" })).devices).toEqual([]);
  } finally {
    client.close();
    await ch.close();
  }
});

test("SIGTERM stops accepting, lets the in-flight call finish, and exits 0", async () => {
  const ch = await ChDouble.start(path.join(dir, "ch.sock"));
  ch.setState("Running");
  const inventory = path.join(dir, "inventory.json");
  fs.writeFileSync(inventory, JSON.stringify({ vms: [{ name: "vm", hypervisor: "cloud-hypervisor", socket: path.join(dir, "ch.sock") }] }));
  vfiod = await startVfiod(["--inventory", inventory, "--cocoon-root", dir]);
  const client = createDeviceClient(vfiod.address);
  try {
    ch.inject("vm.info", { kind: "delay", ms: 800 });
    const inFlight = client.list({ vm: "vm" }, { timeoutMs: 10_000 });
    await waitFor(() => ch.requests.length > 0, "the List reaches Cloud Hypervisor");
    vfiod.child.kill("SIGTERM");
    await expect(inFlight).resolves.toEqual(expect.objectContaining({ devices: [] }));
    expect(await vfiod.exited).toBe(0);
    expect(vfiod.logs.map((l) => l.msg)).toEqual(expect.arrayContaining(["draining: no new calls, finishing in-flight ones", "vfiod stopped"]));
  } finally {
    client.close();
    await ch.close();
  }
});

test("--metrics-listen serves Prometheus counters of DeviceService calls", async () => {
  vfiod = await startVfiod(["--cocoon-root", dir, "--metrics-listen", "127.0.0.1:0"]);
  const metricsLine = vfiod.logs.find((l) => l.msg === "metrics serving on /metrics");
  expect(metricsLine).toBeDefined();
  const client = createDeviceClient(vfiod.address);
  try {
    await expect(client.list({ vm: "nope" })).rejects.toMatchObject({ code: grpc.status.NOT_FOUND });
  } finally {
    client.close();
  }
  const response = await fetch(`http://127.0.0.1:${String(metricsLine!.port)}/metrics`);
  expect(response.status).toBe(200);
  expect(await response.text()).toMatch(/vfiod_grpc_calls_total\{method="List",code="NOT_FOUND"\} 1/);
  expect((await fetch(`http://127.0.0.1:${String(metricsLine!.port)}/other`)).status).toBe(404);
});


test.each([
  [["--listen", "0.0.0.0:50051"], { VFIOD_INSECURE: "false" }, "refusing plaintext gRPC on non-loopback 0.0.0.0:50051"],
  [["--listen", "0.0.0.0:50051"], { VFIOD_INSECURE: "maybe" }, 'VFIOD_INSECURE="maybe"'],
  [[], { VFIOD_DETACH_TIMEOUT: "abc" }, "duration"],
  [[], { VFIOD_SOCKET_MODE: "999" }, "octal"],
  [[], { VFIOD_HYPERVISOR_TIMEOUT: "0s" }, "more than 0"],
  [[], { VFIOD_LOG_LEVEL: "loud" }, "loud"],
  [["--listen", "none"], {}, "--listen none needs --socket"],
  [[], { VFIOD_LISTEN: "none" }, "--listen none needs --socket"],
  [["--metrics-listen", "0.0.0.0:9100"], {}, "refusing plaintext metrics on non-loopback 0.0.0.0:9100"],
  [["--socket", "/tmp/vfiod-never.sock", "--socket-group", "no-such-group-vfiod"], {}, '--socket-group: no group named "no-such-group-vfiod"'],
])("%j with %j exits 2 with the reason and usage, serving nothing (issue 8 items 1, 2, 4)", async (args, env, reason) => {
  const run = await runVfiodToExit(["--cocoon-root", dir, ...args], env);
  expect(run.exit).toBe(2);
  expect(run.stderr).toContain(reason);
  expect(run.stderr).toContain("Usage: vfiod");
  expect(run.logs.map((l) => l.msg)).not.toContain("vfiod serving");
});

/** TCP ports process `pid` listens on: /proc/net/tcp{,6} LISTEN entries whose socket inode the process holds open. */
function listeningTcpPorts(pid: number): number[] {
  const inodes = new Set<string>();
  for (const fd of fs.readdirSync(`/proc/${pid}/fd`)) {
    try {
      const match = /^socket:\[(\d+)\]$/.exec(fs.readlinkSync(`/proc/${pid}/fd/${fd}`));
      if (match) inodes.add(match[1]!);
    } catch {
      // closed meanwhile
    }
  }
  const ports: number[] = [];
  for (const table of ["tcp", "tcp6"]) {
    let text: string;
    try {
      text = fs.readFileSync(`/proc/${pid}/net/${table}`, "utf8");
    } catch {
      continue; // no IPv6
    }
    for (const line of text.trim().split("\n").slice(1)) {
      const fields = line.trim().split(/\s+/);
      const [, local = "", , state, , , , , , inode = ""] = fields;
      if (state === "0A" && inodes.has(inode)) ports.push(Number.parseInt(local.split(":")[1]!, 16));
    }
  }
  return ports;
}

describe("--listen none: the Unix socket alone (issue 8 item 2)", () => {
  test.each([
    ["--listen none", ["--listen", "none"], {}],
    ['--listen ""', ["--listen", ""], {}],
    ["VFIOD_LISTEN=none", [], { VFIOD_LISTEN: "none" }],
  ])("%s: no TCP socket listens, and gRPC over unix: works", async (_name, args, env) => {
    const socket = path.join(dir, "vfiod.sock");
    // With no --listen at all, VFIOD_LISTEN is read (a flag would win over it).
    vfiod = await startVfiod(["--cocoon-root", dir, "--socket", socket, ...args], env, { ephemeralListen: false });
    const serving = vfiod.logs.find((l) => l.msg === "vfiod serving");
    expect(serving).toMatchObject({ listen: "none", socket });
    expect(serving?.port).toBeUndefined();
    expect(vfiod.address).toBe("");
    expect(listeningTcpPorts(vfiod.child.pid!)).toEqual([]);
    expect(await checkHealth(`unix:${socket}`, "vfiod.v1.DeviceService")).toBe("SERVING");
    const client = createDeviceClient(`unix:${socket}`);
    try {
      const err = await client.list({ vm: "demo" }).catch((e: unknown) => e as grpc.ServiceError);
      expect({ code: (err as grpc.ServiceError).code, reason: errorReason(err) }).toEqual({ code: grpc.status.NOT_FOUND, reason: "VM_NOT_FOUND" });
    } finally {
      client.close();
    }
    expect(await vfiod.stop()).toBe(0);
  });

  test("the check itself sees the TCP listener of a vfiod that has one", async () => {
    vfiod = await startVfiod(["--cocoon-root", dir]);
    expect(listeningTcpPorts(vfiod.child.pid!)).toEqual([Number(vfiod.address.split(":")[1])]);
  });
});

describe("--socket start-up (issue 8 item 3)", () => {
  test("a second vfiod on the socket another serves refuses to start, and the first keeps serving", async () => {
    const socket = path.join(dir, "vfiod.sock");
    vfiod = await startVfiod(["--cocoon-root", dir, "--socket", socket]);
    const second = await runVfiodToExit(["--listen", "127.0.0.1:0", "--cocoon-root", dir, "--socket", socket]);
    expect(second.exit).not.toBe("running");
    expect(second.exit).not.toBe(0);
    const fatal = second.logs.find((l) => l.msg === "vfiod failed to start");
    expect(JSON.stringify(fatal?.err)).toContain(`--socket ${socket}: another process is serving on it`);
    // The first still owns the path: health and a DeviceService call answer over it.
    expect(fs.lstatSync(socket).isSocket()).toBe(true);
    expect(await checkHealth(`unix:${socket}`, "")).toBe("SERVING");
    const client = createDeviceClient(`unix:${socket}`);
    try {
      await expect(client.list({ vm: "nope" })).rejects.toMatchObject({ code: grpc.status.NOT_FOUND });
    } finally {
      client.close();
    }
    expect(vfiod.child.exitCode).toBeNull();
  });

  test("a socket file left by a SIGKILLed vfiod is replaced", async () => {
    const socket = path.join(dir, "vfiod.sock");
    const killed = await startVfiod(["--cocoon-root", dir, "--socket", socket]);
    killed.child.kill("SIGKILL");
    expect(await killed.exited).toBe("SIGKILL");
    expect(fs.lstatSync(socket).isSocket()).toBe(true); // stale: nothing accepts on it
    vfiod = await startVfiod(["--cocoon-root", dir, "--socket", socket, "--socket-mode", "0600"]);
    expect(await checkHealth(`unix:${socket}`, "")).toBe("SERVING");
    expect(fs.lstatSync(socket).mode & 0o777).toBe(0o600);
  });

  test("a regular file at the path is refused and left alone", async () => {
    const socket = path.join(dir, "vfiod.sock");
    fs.writeFileSync(socket, "not a socket\n");
    const run = await runVfiodToExit(["--listen", "127.0.0.1:0", "--cocoon-root", dir, "--socket", socket]);
    expect(run.exit).toBe(1);
    expect(JSON.stringify(run.logs.find((l) => l.msg === "vfiod failed to start")?.err)).toContain(
      `--socket ${socket} exists and is not a socket; refusing to replace it`,
    );
    expect(fs.readFileSync(socket, "utf8")).toBe("not a socket\n");
  });

  // Looked at from another process in a tight loop, and from fs.watch here, while vfiod
  // starts (three times) with umask 000: the path never exists with any mode or group
  // but the ones asked for. A socket bound in place would show 0777 until its chmod.
  test("the socket is never reachable with wider permissions or another group than asked", async () => {
    const socket = path.join(dir, "vfiod.sock");
    const stopFile = path.join(dir, "stop-watching");
    const gid = process.getuid?.() === 0 ? 4242 : (process.getgroups?.().find((g) => g !== process.getgid?.()) ?? process.getgid!());
    const asked = `${(0o140600).toString(8)} gid ${gid}`;
    const watcherScript = `
      const fs = require("node:fs");
      const [socket, stopFile] = process.argv.slice(1);
      const seen = {};
      let looks = 0;
      const until = Date.now() + 45000;
      process.stdout.write("ready\\n");
      while (!fs.existsSync(stopFile) && Date.now() < until) {
        for (let i = 0; i < 200; i++) {
          looks++;
          let st;
          try { st = fs.lstatSync(socket); } catch { continue; }
          const key = (st.mode & 0o170777).toString(8) + " gid " + st.gid;
          seen[key] = (seen[key] || 0) + 1;
        }
      }
      process.stdout.write(JSON.stringify({ seen, looks }));`;
    const watcher = spawn(process.execPath, ["-e", watcherScript, socket, stopFile], { stdio: ["ignore", "pipe", "inherit"] });
    let watcherOut = "";
    watcher.stdout.setEncoding("utf8").on("data", (chunk: string) => (watcherOut += chunk));
    const watcherDone = new Promise<void>((resolve) => watcher.once("exit", () => resolve()));
    const fromWatch: string[] = [];
    const dirWatch = fs.watch(dir, (_event, name) => {
      if (name !== "vfiod.sock") return;
      try {
        const st = fs.lstatSync(socket);
        fromWatch.push(`${(st.mode & 0o170777).toString(8)} gid ${st.gid}`);
      } catch {
        // gone again
      }
    });
    try {
      await waitFor(() => watcherOut.startsWith("ready\n"), "the watcher is looking");
      for (let round = 0; round < 3; round++) {
        const umask = process.umask(0o000); // inherited by the child
        let started: Promise<VfiodProcess>;
        try {
          started = startVfiod(["--cocoon-root", dir, "--socket", socket, "--socket-mode", "0600", "--socket-group", String(gid)]);
        } finally {
          process.umask(umask);
        }
        vfiod = await started;
        expect(await checkHealth(`unix:${socket}`, "")).toBe("SERVING");
        expect(fs.lstatSync(socket)).toMatchObject({ mode: 0o140600, gid });
        // No private bind directory is left beside it.
        expect(fs.readdirSync(dir).filter((name) => name.startsWith(".vfiod-bind-"))).toEqual([]);
        expect(await vfiod.stop()).toBe(0);
        vfiod = undefined;
      }
    } finally {
      fs.writeFileSync(stopFile, "");
      await watcherDone;
      dirWatch.close();
    }
    const { seen, looks } = JSON.parse(watcherOut.slice("ready\n".length)) as { seen: Record<string, number>; looks: number };
    expect(looks).toBeGreaterThan(1000);
    expect({ seen: Object.keys(seen), fromWatch: [...new Set(fromWatch)] }).toEqual({ seen: [asked], fromWatch: [asked] });
  });
});

test("--metrics-listen off the loopback starts with --insecure, which it warns about once (issue 8 item 4)", async () => {
  vfiod = await startVfiod(["--cocoon-root", dir, "--metrics-listen", "0.0.0.0:0", "--insecure"]);
  const warnings = vfiod.logs.filter((l) => l.level === "warn").map((l) => l.msg);
  expect(warnings.filter((m) => String(m).startsWith("--insecure:"))).toHaveLength(1);
  const metricsLine = vfiod.logs.find((l) => l.msg === "metrics serving on /metrics");
  expect(metricsLine).toMatchObject({ metricsListen: "0.0.0.0:0" });
  const response = await fetch(`http://127.0.0.1:${String(metricsLine!.port)}/metrics`);
  expect(response.status).toBe(200);
});

test("on a fresh machine, VM_NOT_FOUND says how many VMs vfiod sees and where it looked (issue 8 item 17)", async () => {
  const cocoonRoot = path.join(dir, "no-cocoon-here");
  vfiod = await startVfiod(["--cocoon-root", cocoonRoot]);
  const client = createDeviceClient(vfiod.address);
  try {
    const err = (await client.list({ vm: "demo" }).catch((e: unknown) => e)) as grpc.ServiceError;
    expect({ code: err.code, reason: errorReason(err) }).toEqual({ code: grpc.status.NOT_FOUND, reason: "VM_NOT_FOUND" });
    expect(err.details).toBe(
      `vm "demo" not found among the 0 VMs vfiod can see (no --inventory file given; cocoon root ${cocoonRoot} does not exist)`,
    );
  } finally {
    client.close();
  }
});
