// --metrics-listen through the real process, scraped over HTTP: hypervisor request
// latency by backend and operation, devices attached per VM, inventory size and the
// queue per hypervisor socket move as calls are made.
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { createDeviceClient, createInventoryClient, type DeviceClient } from "../src/grpc/client";
import { ChDouble } from "./support/ch-double";
import { buildFakeSysfs, type FakeSysfs } from "./support/fake-sysfs";
import { QmpDouble } from "./support/qmp-double";
import { startVfiod, type VfiodProcess } from "./support/vfiod-process";
import { waitFor } from "./support/wait";

let dir: string;
let sysfs: FakeSysfs;
let ch: ChDouble;
let qmp: QmpDouble;
let vfiod: VfiodProcess;
let client: DeviceClient;
let metricsUrl: string;

beforeAll(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "vfiod-metrics-"));
  sysfs = buildFakeSysfs([{ bdf: "0000:01:00.0", driver: "vfio-pci", group: 12 }]);
  ch = await ChDouble.start(path.join(dir, "ch.sock"), { sysfsRoot: sysfs.root, ejectAfterMs: 5 });
  ch.setState("Running");
  // A monitor that never greets: every session waits, the next ones queue behind it.
  qmp = await QmpDouble.start({ greets: false });
  const inventory = path.join(dir, "inventory.json");
  fs.writeFileSync(
    inventory,
    JSON.stringify({
      vms: [
        { name: "vm", hypervisor: "cloud-hypervisor", socket: ch.socketPath },
        { name: "stuck", hypervisor: "qemu", socket: qmp.socket },
      ],
    }),
  );
  vfiod = await startVfiod([
    ...["--inventory", inventory, "--sysfs-root", sysfs.root, "--cocoon-root", path.join(dir, "none")],
    ...["--metrics-listen", "127.0.0.1:0", "--refresh-interval", "1h"],
  ]);
  const port = vfiod.logs.find((l) => l.msg === "metrics serving on /metrics")?.port;
  metricsUrl = `http://127.0.0.1:${String(port)}/metrics`;
  client = createDeviceClient(vfiod.address);
});

afterAll(async () => {
  client.close();
  await vfiod.stop();
  await ch.close();
  await qmp.close();
  sysfs.cleanup();
  fs.rmSync(dir, { recursive: true, force: true });
});

/** The value of one sample line, `name{labels} value`, or undefined when absent. */
async function sample(name: string, labels: Record<string, string>): Promise<number | undefined> {
  const text = await (await fetch(metricsUrl)).text();
  const want = Object.entries(labels).map(([k, v]) => `${k}="${v}"`);
  for (const line of text.split("\n")) {
    if (!line.startsWith(`${name}{`)) continue;
    const labelText = line.slice(name.length + 1, line.indexOf("}"));
    if (want.every((pair) => labelText.split(",").includes(pair))) return Number(line.slice(line.lastIndexOf(" ") + 1));
  }
  return undefined;
}

test("hypervisor request latency by backend and operation counts each request", async () => {
  const count = () => sample("vfiod_hypervisor_call_duration_seconds_count", { backend: "cloud-hypervisor", operation: "vm.info", answered: "true" });
  // After the background refresh's first pass (at start), which reads the VM too.
  await waitFor(async () => ((await count()) ?? 0) >= 1, "the first background read is counted");
  const before = (await count()) ?? 0;
  await client.list({ vm: "vm" });
  await client.list({ vm: "vm" });
  expect(await count()).toBe(before + 2);
});

test("devices attached per VM follow Attach and Detach", async () => {
  await client.attach({ vm: "vm", pci: "01:00.0", id: "gpu0" });
  expect(await sample("vfiod_vm_attached_devices", { vm: "vm" })).toBe(1);
  await client.detach({ vm: "vm", id: "gpu0" });
  expect(await sample("vfiod_vm_attached_devices", { vm: "vm" })).toBe(0);
});

test("inventory size by source", async () => {
  expect(await sample("vfiod_inventory_vms", { source: "inventory" })).toBe(2);
  expect(await sample("vfiod_inventory_vms", { source: "cocoon" })).toBe(0);
});

test("the queue per hypervisor socket shows callers waiting behind a stuck monitor, and empties", async () => {
  const inventory = createInventoryClient(vfiod.address);
  // Each ListVms asks the QEMU VM's state in a monitor session of its own: they queue.
  const calls = [1, 2, 3].map(() => inventory.listVms({}, { timeoutMs: 10_000 }));
  const queued = () => sample("vfiod_hypervisor_queue_length", { backend: "qemu", socket: qmp.socket });
  await waitFor(async () => ((await queued()) ?? 0) >= 1, "callers queue for the stuck monitor");
  await Promise.all(calls);
  await waitFor(async () => (await queued()) === undefined, "the queue empties", 20_000);
  inventory.close();
});
