// The busy host (issue 9): 100 Cloud Hypervisor VMs (doubles that keep CH's limit
// of 10 connections per API socket and answer the 11th with a raw 503), each with
// its own vfio-pci device, a control plane calling in parallel, one wedged VMM.
// Every call over real gRPC to an in-process vfiod.
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { ChDouble } from "../support/ch-double";
import { buildFakeSysfs, type FakeSysfs } from "../support/fake-sysfs";
import { outcomeOf, Tally } from "../support/load";
import { QmpDouble } from "../support/qmp-double";
import { failure, startTestServer, type TestServer } from "../support/test-server";
import { waitFor } from "../support/wait";

const VMS = 100;
const name = (i: number) => `vm${String(i).padStart(3, "0")}`;
/** vm i's own device: buses 0x10.. (one IOMMU group each). */
const bdf = (i: number) => `0000:${(0x10 + i).toString(16).padStart(2, "0")}:00.0`;

let dir: string;
let sysfs: FakeSysfs;
const doubles: ChDouble[] = [];

function inventory(file: string, count: number, extra: object[] = []): string {
  const vms = Array.from({ length: count }, (_, i) => ({ name: name(i), hypervisor: "cloud-hypervisor", socket: doubles[i]!.socketPath }));
  fs.writeFileSync(file, JSON.stringify({ vms: [...vms, ...extra] }));
  return file;
}

/** Every request any double received, in total. */
const totalRequests = () => doubles.reduce((n, d) => n + d.requests.length, 0);

beforeAll(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "vfiod-busy-"));
  sysfs = buildFakeSysfs(Array.from({ length: VMS }, (_, i) => ({ bdf: bdf(i), driver: "vfio-pci", group: 100 + i })));
  for (let i = 0; i < VMS; i++) {
    const double = await ChDouble.start(path.join(dir, `${name(i)}.sock`), { sysfsRoot: sysfs.root, ejectAfterMs: 5 });
    double.setState("Running");
    doubles.push(double);
  }
}, 60_000);

afterAll(async () => {
  for (const double of doubles) await double.close();
  sysfs.cleanup();
  fs.rmSync(dir, { recursive: true, force: true });
});

describe(`${VMS} VMs, a control plane calling in parallel`, () => {
  let server: TestServer;
  beforeAll(async () => {
    server = await startTestServer({ inventoryFile: inventory(path.join(dir, "all.json"), VMS), sysfsRoot: sysfs.root });
  });
  afterAll(async () => server.stop());

  test("100 parallel Attaches, one per VM, all succeed; so do 100 parallel Detaches", async () => {
    const attached = await Promise.all(
      Array.from({ length: VMS }, (_, i) => outcomeOf(server.client.attach({ vm: name(i), pci: bdf(i), id: "gpu0" }, { timeoutMs: 30_000 }))),
    );
    const tally = new Tally();
    attached.forEach(({ outcome }) => tally.add(outcome.key));
    expect(tally.toString()).toBe(`OK=${VMS}`);
    const detached = await Promise.all(
      Array.from({ length: VMS }, (_, i) => outcomeOf(server.client.detach({ vm: name(i), id: "gpu0" }, { timeoutMs: 30_000 }))),
    );
    const detachTally = new Tally();
    detached.forEach(({ outcome }) => detachTally.add(outcome.key));
    expect(detachTally.toString()).toBe(`OK=${VMS}`);
  });

  test("200 concurrent Lists of one VM all succeed and share their reads: the VM sees at most 20 vm.info", async () => {
    const double = doubles[7]!;
    // CH answers one request at a time; each takes 20 ms here.
    for (let i = 0; i < 200; i++) double.inject("vm.info", { kind: "delay", ms: 20 });
    const before = double.requests.length;
    const lists = await Promise.all(Array.from({ length: 200 }, () => outcomeOf(server.client.list({ vm: name(7) }, { timeoutMs: 30_000 }))));
    const tally = new Tally();
    lists.forEach(({ outcome }) => tally.add(outcome.key));
    expect(tally.toString()).toBe("OK=200");
    const infos = double.requests.slice(before).filter((r) => r.endpoint === "vm.info").length;
    expect(infos).toBeGreaterThan(0);
    expect(infos).toBeLessThanOrEqual(20);
  });

  test("an Attach and a Detach send as many hypervisor requests with 100 VMs on the host as with 1", async () => {
    const one = await startTestServer({ inventoryFile: inventory(path.join(dir, "one.json"), 1), sysfsRoot: sysfs.root });
    const counted = async (s: TestServer, i: number): Promise<{ attach: number; detach: number }> => {
      let before = totalRequests();
      await s.client.attach({ vm: name(i), pci: bdf(i), id: "count" });
      const attach = totalRequests() - before;
      before = totalRequests();
      await s.client.detach({ vm: name(i), id: "count" });
      return { attach, detach: totalRequests() - before };
    };
    try {
      const withOne = await counted(one, 0);
      const withHundred = await counted(server, 0);
      // vm.info + add-device; vm.info + remove-device + the vm.info polls until the guest ejects.
      expect(withOne.attach).toBe(2);
      expect(withHundred.attach).toBe(withOne.attach);
      expect(withHundred.detach).toBeLessThanOrEqual(withOne.detach + 2);
      expect(withHundred.detach).toBeLessThan(10);
    } finally {
      await one.stop();
    }
  });

  test("three callers attaching one device to three VMs: exactly one wins, the others are told which VM holds it", async () => {
    const outcomes = await Promise.all(
      [3, 4, 5].map((vm) => outcomeOf(server.client.attach({ vm: name(vm), pci: bdf(9), id: "shared" }, { timeoutMs: 10_000 }))),
    );
    const winners = outcomes.filter(({ outcome }) => outcome.key === "OK");
    expect(winners).toHaveLength(1);
    const winner = [3, 4, 5].find((_, i) => outcomes[i]!.outcome.key === "OK")!;
    for (const { outcome } of outcomes.filter(({ outcome }) => outcome.key !== "OK")) {
      expect(outcome.key).toBe("FAILED_PRECONDITION/DEVICE_IN_USE");
      expect(outcome.message).toContain(`VM ${name(winner)}`);
    }
    await server.client.detach({ vm: name(winner), id: "shared" });
  });
});

describe("one wedged VMM", () => {
  let hung: ChDouble;
  let server: TestServer;
  beforeAll(async () => {
    hung = await ChDouble.start(path.join(dir, "hung.sock"));
    hung.setState("Running");
    // CH serves one request at a time: one that never ends wedges the whole API.
    hung.inject("vm.info", { kind: "hang" });
    server = await startTestServer({
      inventoryFile: inventory(path.join(dir, "with-hung.json"), 10, [{ name: "hung", hypervisor: "cloud-hypervisor", socket: hung.socketPath }]),
      sysfsRoot: sysfs.root,
      hypervisorTimeoutMs: 2000,
      // The background refresh reads every VM, the hung one included.
      refreshIntervalMs: 200,
    });
    await waitFor(() => hung.requests.length > 0, "the background refresh reaches the hung VM");
  });
  afterAll(async () => {
    await server.stop();
    await hung.close();
  });

  test("Attach, List and Detach on other VMs do not wait for it", async () => {
    for (let round = 0; round < 3; round++) {
      const started = performance.now();
      await server.client.attach({ vm: name(1), pci: bdf(1), id: "gpu0" }, { timeoutMs: 5000 });
      await server.client.list({ vm: name(2) }, { timeoutMs: 5000 });
      await server.client.detach({ vm: name(1), id: "gpu0" }, { timeoutMs: 5000 });
      // A few ms each when nothing waits; the hung VM's own bound is 2 s.
      expect(performance.now() - started).toBeLessThan(1500);
    }
  });

  test("with no caller deadline, its own List ends at vfiod's --hypervisor-timeout, not never", async () => {
    const started = performance.now();
    const err = await failure(server.client.list({ vm: "hung" }));
    const ms = performance.now() - started;
    expect({ code: err.code, reason: err.reason }).toEqual({ code: 4, reason: "HYPERVISOR_UNAVAILABLE" });
    expect(err.message).toContain("--hypervisor-timeout");
    expect(ms).toBeGreaterThanOrEqual(1500);
    expect(ms).toBeLessThan(8000);
  });

  test("the background refresh notes it unreachable and keeps serving the others", async () => {
    await waitFor(() => server.vfiod.view.all().some((known) => known.vm.name === "hung" && known.unreachable !== undefined), "hung noted");
    await waitFor(() => server.vfiod.view.all().filter((known) => known.unreachable === undefined).length >= 10, "the others read");
  });
});

describe("QEMU: one monitor session at a time, shared reads", () => {
  test("50 concurrent Lists of one QEMU VM all succeed in a few monitor sessions", async () => {
    const qmp = await QmpDouble.start({ hostDevices: ["0000:01:00.0"] });
    const server = await startTestServer({
      inventoryFile: ((file) => (fs.writeFileSync(file, JSON.stringify({ vms: [{ name: "q", hypervisor: "qemu", socket: qmp.socket }] })), file))(
        path.join(dir, "qemu.json"),
      ),
      sysfsRoot: sysfs.root,
    });
    try {
      const lists = await Promise.all(Array.from({ length: 50 }, () => outcomeOf(server.client.list({ vm: "q" }, { timeoutMs: 20_000 }))));
      const tally = new Tally();
      lists.forEach(({ outcome }) => tally.add(outcome.key));
      expect(tally.toString()).toBe("OK=50");
      const sessions = qmp.commands("qmp_capabilities").length;
      expect(sessions).toBeGreaterThan(0);
      expect(sessions).toBeLessThanOrEqual(5);
    } finally {
      await server.stop();
      await qmp.close();
    }
  });
});
