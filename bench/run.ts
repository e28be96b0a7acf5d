// `npm run bench`: vfiod's overhead, as ratios against baselines measured in the
// same run on the same machine (absolute times vary too much to compare):
//   - List through vfiod (gRPC + inventory + backend) vs one raw vm.info to the
//     Cloud Hypervisor double;
//   - an Attach+Detach cycle through vfiod vs the raw add-device + remove-device
//     + vm.info polls it needs;
//   - a refused Attach (bad input) vs a gRPC round trip that does no work
//     (health check on the same kind of reused channel), i.e. what validation costs;
//   - heap growth per 1,000 operations after warm-up (should stay near 0).
import * as grpc from "@grpc/grpc-js";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { Client } from "undici";
import { CloudHypervisorBackend } from "../src/backends/cloud-hypervisor/backend";
import { BackendRegistry } from "../src/backends/registry";
import { silentLogger } from "../src/log";
import { ChDouble } from "../test/support/ch-double";
import { buildFakeSysfs } from "../test/support/fake-sysfs";
import { startTestServer } from "../test/support/test-server";

const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 300);

async function timePerOp(rounds: number, op: () => Promise<unknown>): Promise<number> {
  for (let i = 0; i < Math.min(50, rounds); i++) await op();
  const started = process.hrtime.bigint();
  for (let i = 0; i < rounds; i++) await op();
  return Number(process.hrtime.bigint() - started) / 1e6 / rounds;
}

async function main(): Promise<void> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "vfiod-bench-"));
  const sysfs = buildFakeSysfs([{ bdf: "0000:01:00.0", driver: "vfio-pci", group: 1 }]);
  const socket = path.join(dir, "ch.sock");
  const ch = await ChDouble.start(socket, { ejectAfterMs: 0 });
  ch.setState("Running");
  const inventoryFile = path.join(dir, "inventory.json");
  fs.writeFileSync(inventoryFile, JSON.stringify({ vms: [{ name: "vm", hypervisor: "cloud-hypervisor", socket }] }));
  const server = await startTestServer({
    inventoryFile,
    sysfsRoot: sysfs.root,
    backends: new BackendRegistry().register("cloud-hypervisor", new CloudHypervisorBackend({ pollIntervalMs: 1 })),
    log: silentLogger(),
  });
  const raw = async (method: "GET" | "PUT", endpoint: string, body?: string) => {
    const client = new Client("http://localhost", { socketPath: socket });
    try {
      const response = await client.request({ path: `/api/v1/${endpoint}`, method, body });
      await response.body.text();
    } finally {
      await client.close();
    }
  };
  try {
    const rawInfo = await timePerOp(ROUNDS, () => raw("GET", "vm.info"));
    const list = await timePerOp(ROUNDS, () => server.client.list({ vm: "vm" }));
    const rawCycle = await timePerOp(ROUNDS, async () => {
      await raw("GET", "vm.info");
      await raw("PUT", "vm.add-device", JSON.stringify({ id: "b0", path: "/sys/bus/pci/devices/0000:01:00.0" }));
      await raw("GET", "vm.info");
      await raw("PUT", "vm.remove-device", JSON.stringify({ id: "b0" }));
      await raw("GET", "vm.info");
    });
    const cycle = await timePerOp(ROUNDS, async () => {
      await server.client.attach({ vm: "vm", pci: "01:00.0", id: "b1" });
      await server.client.detach({ vm: "vm", id: "b1" });
    });
    const healthClient = new grpc.Client(server.address, grpc.credentials.createInsecure());
    const health = await timePerOp(
      ROUNDS,
      () =>
        new Promise((resolve, reject) =>
          healthClient.makeUnaryRequest(
            "/grpc.health.v1.Health/Check",
            (b: Buffer) => b,
            (b: Buffer) => b,
            Buffer.alloc(0),
            (err, res) => (err ? reject(err) : resolve(res)),
          ),
        ),
    );
    healthClient.close();
    const refused = await timePerOp(ROUNDS, () => server.client.attach({ vm: "vm", pci: "/etc/passwd", id: "" }).catch(() => undefined));

    global.gc?.();
    const heapBefore = process.memoryUsage().heapUsed;
    for (let i = 0; i < 1000; i++) await server.client.list({ vm: "vm" });
    global.gc?.();
    const heapGrowthKiB = (process.memoryUsage().heapUsed - heapBefore) / 1024;

    // Targets: what vfiod adds must stay a small multiple of what it has to do anyway.
    const rows = [
      ["List via vfiod / raw vm.info", list / rawInfo, 4, `${list.toFixed(2)} ms vs ${rawInfo.toFixed(2)} ms`],
      ["Attach+Detach via vfiod / raw requests", cycle / rawCycle, 4, `${cycle.toFixed(2)} ms vs ${rawCycle.toFixed(2)} ms`],
      ["refused Attach / health check round trip", refused / health, 1.5, `${refused.toFixed(2)} ms vs ${health.toFixed(2)} ms`],
    ] as const;
    console.log(`vfiod bench, ${ROUNDS} rounds each, node ${process.version}, ${os.cpus().length} cpus`);
    for (const [name, ratio, target, detail] of rows) {
      console.log(`${name.padEnd(44)} ${ratio.toFixed(2)}x  target <= ${target}x ${ratio <= target ? "ok" : "MISSED"}  (${detail})`);
    }
    const heapTargetKiB = 1024;
    console.log(
      `${"heap growth per 1,000 Lists".padEnd(44)} ${heapGrowthKiB.toFixed(0)} KiB  target <= ${heapTargetKiB} KiB ` +
        `${heapGrowthKiB <= heapTargetKiB ? "ok" : "MISSED"}${global.gc ? "" : " (run with --expose-gc for a steadier figure)"}`,
    );
  } finally {
    await server.stop();
    await ch.close();
    sysfs.cleanup();
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

void main();
