// The vfiod process: flags, exit codes, serving, and draining on SIGTERM.
import * as grpc from "@grpc/grpc-js";
import { spawnSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { createDeviceClient } from "../src/grpc/client";
import { ChDouble } from "./support/ch-double";
import { checkHealth } from "./support/grpc-clients";
import { MAIN_JS, startVfiod, type VfiodProcess } from "./support/vfiod-process";
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

