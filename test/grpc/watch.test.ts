// Watch over real gRPC: the snapshot (PRESENT per attached device, then SYNCED),
// then changes in order: vfiod's own attaches and detaches, a pending removal that
// completes later, a device attached outside vfiod; and a stalled watcher, which
// slows no Attach and is ended with RESOURCE_EXHAUSTED.
import * as grpc from "@grpc/grpc-js";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { WatchEvent_Kind, type WatchEvent } from "../../gen/vfiod/v1/device_pb";
import { CloudHypervisorBackend } from "../../src/backends/cloud-hypervisor/backend";
import { CloudHypervisorSockets } from "../../src/backends/cloud-hypervisor/client";
import { BackendRegistry } from "../../src/backends/registry";
import { errorReason } from "../../src/grpc/client";
import { ChDouble } from "../support/ch-double";
import { buildFakeSysfs, type FakeSysfs } from "../support/fake-sysfs";
import { failure, startTestServer, type TestServer } from "../support/test-server";
import { waitFor } from "../support/wait";

const GPU = "0000:01:00.0";
const NIC = "0000:02:00.0";
const NVME = "0000:03:00.0";

let dir: string;
let sysfs: FakeSysfs;
const chs = new Map<string, ChDouble>();
let server: TestServer;

/** A watch whose events a test reads as they come. */
function watch(vm: string): { events: WatchEvent[]; stream: grpc.ClientReadableStream<WatchEvent>; ended: Promise<unknown> } {
  const stream = server.client.watch({ vm });
  const events: WatchEvent[] = [];
  stream.on("data", (event: WatchEvent) => events.push(event));
  const ended = new Promise((resolve) => {
    stream.on("error", resolve);
    stream.on("end", () => resolve(undefined));
  });
  return { events, stream, ended };
}

const shown = (events: readonly WatchEvent[]) =>
  events.map((e) => `${WatchEvent_Kind[e.kind]} ${e.vm} ${e.device?.id ?? ""}${e.device?.bdf ? `=${e.device.bdf}` : ""}`.trim());

beforeEach(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "vfiod-watch-"));
  sysfs = buildFakeSysfs([
    { bdf: GPU, driver: "vfio-pci", group: 12 },
    { bdf: NIC, driver: "vfio-pci", group: 13 },
    { bdf: NVME, driver: "vfio-pci", group: 14 },
  ]);
  for (const name of ["vm-a", "vm-b"]) {
    const double = await ChDouble.start(path.join(dir, `${name}.sock`), { sysfsRoot: sysfs.root });
    double.setState("Running");
    chs.set(name, double);
  }
  const inventoryFile = path.join(dir, "inventory.json");
  fs.writeFileSync(
    inventoryFile,
    JSON.stringify({ vms: [...chs].map(([name, d]) => ({ name, hypervisor: "cloud-hypervisor", socket: d.socketPath })) }),
  );
  // CH is read every 5 ms while a removal completes, so an Attach+Detach cycle takes a few ms.
  const backends = new BackendRegistry().register("cloud-hypervisor", new CloudHypervisorBackend({ pollIntervalMs: 5 }));
  server = await startTestServer({ inventoryFile, sysfsRoot: sysfs.root, detachTimeoutMs: 300, refreshIntervalMs: 100, backends });
});

afterEach(async () => {
  await server.stop();
  for (const double of chs.values()) await double.close();
  chs.clear();
  sysfs.cleanup();
  fs.rmSync(dir, { recursive: true, force: true });
});

test("a snapshot of what the VM holds, SYNCED, then vfiod's own attach and detach in order", async () => {
  const ch = chs.get("vm-a")!;
  await server.client.attach({ vm: "vm-a", pci: GPU, id: "gpu0" });
  const w = watch("vm-a");
  await waitFor(() => w.events.some((e) => e.kind === WatchEvent_Kind.SYNCED), "SYNCED");
  // An Attach of a device that completes its removal at once (the guest ejects on request).
  await server.client.attach({ vm: "vm-a", pci: NIC, id: "nic0" });
  const detaching = server.client.detach({ vm: "vm-a", id: "nic0" });
  await waitFor(() => ch.pendingRemovals().includes("nic0"), "removal requested");
  ch.guestEjects("nic0");
  await detaching;
  await waitFor(() => w.events.length >= 5, "five events");
  expect(shown(w.events)).toEqual([
    `PRESENT vm-a gpu0=${GPU}`,
    "SYNCED",
    `ATTACHED vm-a nic0=${NIC}`,
    `DETACH_REQUESTED vm-a nic0=${NIC}`,
    `DETACHED vm-a nic0=${NIC}`,
  ]);
  expect(w.events[0]?.detail).toBe("read now");
  expect(w.events[2]?.detail).toBe("by vfiod");
  expect(w.events.every((e) => e.time !== undefined)).toBe(true);
  w.stream.cancel();
});

test("a pending removal: DETACH_REQUESTED, DETACH_PENDING, then DETACHED when the guest lets go later", async () => {
  const ch = chs.get("vm-a")!;
  await server.client.attach({ vm: "vm-a", pci: GPU, id: "gpu0" });
  const w = watch("vm-a");
  await waitFor(() => w.events.some((e) => e.kind === WatchEvent_Kind.SYNCED), "SYNCED");
  expect((await failure(server.client.detach({ vm: "vm-a", id: "gpu0" }))).reason).toBe("DETACH_PENDING");
  ch.guestEjects("gpu0");
  // The background refresh finds it gone.
  await waitFor(() => w.events.some((e) => e.kind === WatchEvent_Kind.DETACHED), "DETACHED");
  expect(shown(w.events)).toEqual([
    `PRESENT vm-a gpu0=${GPU}`,
    "SYNCED",
    `DETACH_REQUESTED vm-a gpu0=${GPU}`,
    `DETACH_PENDING vm-a gpu0=${GPU}`,
    `DETACHED vm-a gpu0=${GPU}`,
  ]);
  expect(w.events[4]?.detail).toBe("found in the VM's answer");
  w.stream.cancel();
});

test("a device attached outside vfiod is told once vfiod sees it; every VM is watched with an empty vm", async () => {
  await server.client.attach({ vm: "vm-a", pci: GPU, id: "gpu0" });
  const w = watch("");
  await waitFor(() => w.events.some((e) => e.kind === WatchEvent_Kind.SYNCED), "SYNCED");
  await new CloudHypervisorSockets(5000)
    .client(chs.get("vm-b")!.socketPath, "vm-b")
    .addDevice({ path: `/sys/bus/pci/devices/${NVME}`, id: "disk9" }, AbortSignal.timeout(5000));
  await waitFor(() => w.events.some((e) => e.kind === WatchEvent_Kind.ATTACHED), "ATTACHED");
  expect(shown(w.events)).toEqual([`PRESENT vm-a gpu0=${GPU}`, "SYNCED", `ATTACHED vm-b disk9=${NVME}`]);
  expect(w.events[2]?.detail).toBe("found in the VM's answer");
  w.stream.cancel();
});

test("an unknown VM is refused before anything is sent", async () => {
  const w = watch("nope");
  const err = (await w.ended) as grpc.ServiceError;
  expect({ code: err.code, reason: errorReason(err) }).toEqual({ code: grpc.status.NOT_FOUND, reason: "VM_NOT_FOUND" });
  expect(w.events).toEqual([]);
});

test("a stalled watcher does not slow Attach and Detach, and is ended with RESOURCE_EXHAUSTED (WATCHER_BEHIND)", async () => {
  const ch = chs.get("vm-b")!;
  ch.setState("Running");
  const cycle = async () => {
    const started = performance.now();
    await server.client.attach({ vm: "vm-b", pci: NIC, id: "nic0" });
    const detaching = server.client.detach({ vm: "vm-b", id: "nic0" });
    await waitFor(() => ch.pendingRemovals().includes("nic0"), "removal requested", 5000, 1);
    ch.guestEjects("nic0");
    await detaching;
    return performance.now() - started;
  };
  const median = (values: number[]) => [...values].sort((a, b) => a - b)[Math.floor(values.length / 2)]!;
  const baseline: number[] = [];
  for (let i = 0; i < 20; i++) baseline.push(await cycle());

  const stalled = watch("vm-b");
  await waitFor(() => stalled.events.some((e) => e.kind === WatchEvent_Kind.SYNCED), "SYNCED");
  // The client stops reading: HTTP/2 flow control then stops the server's writes too.
  stalled.stream.pause();
  const withStalled: number[] = [];
  // Until vfiod ends the watch on its side (the stalled client hears of it only once it reads again).
  for (let i = 0; i < 2000 && server.vfiod.watch.count() > 0; i++) withStalled.push(await cycle());
  console.log(
    `watch: Attach+Detach cycle p50 ${median(baseline).toFixed(1)} ms alone, ${median(withStalled).toFixed(1)} ms beside a stalled watcher ` +
      `(${withStalled.length} cycles, about ${withStalled.length * 4} events, until vfiod ended it)`,
  );
  expect(server.vfiod.watch.count()).toBe(0);
  stalled.stream.resume();
  const err = (await stalled.ended) as grpc.ServiceError;
  expect({ code: err?.code, reason: errorReason(err) }).toEqual({ code: grpc.status.RESOURCE_EXHAUSTED, reason: "WATCHER_BEHIND" });
  // A few ms of CPU each way; bounded generously for a loaded 2-core machine.
  expect(median(withStalled)).toBeLessThan(median(baseline) * 3 + 20);
  // It may watch again, from a fresh snapshot.
  const again = watch("vm-b");
  await waitFor(() => again.events.some((e) => e.kind === WatchEvent_Kind.SYNCED), "SYNCED again");
  again.stream.cancel();
}, 120_000);
