// Races and a soak against one in-process vfiod over real gRPC, with Cloud
// Hypervisor doubles on real Unix sockets and a fake sysfs of vfio-bound devices:
// - two VMs racing for one device: exactly one wins, one add-device in total;
// - 50 parallel Attach/Detach calls on one VM: the hypervisor never sees two
//   mutations in flight, and the final state is consistent;
// - a removal still pending in the guest: the device still counts as held;
// - a soak of random operations across 20 VMs, checked against a model built
//   from the successful responses.
// Random choices come from a seed printed with the figures (VFIOD_RACE_SEED=<n> replays).
import fc from "fast-check";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { CloudHypervisorBackend } from "../../src/backends/cloud-hypervisor/backend";
import { BackendRegistry } from "../../src/backends/registry";
import { ChDouble } from "../support/ch-double";
import { buildFakeSysfs, type FakeSysfs } from "../support/fake-sysfs";
import { checkHealth } from "../support/grpc-clients";
import {
  isContractRefusal,
  outcomeOf,
  rawVmInfo,
  runPool,
  Tally,
  watchMutationOverlap,
  type Outcome,
} from "../support/load";
import { startTestServer, type TestServer } from "../support/test-server";
import { waitFor } from "../support/wait";

const SEED = Number(process.env.VFIOD_RACE_SEED ?? Math.floor(Math.random() * 0x7fffffff));
const SYSFS_PREFIX = "/sys/bus/pci/devices/";
/** Every call carries a deadline; generous, so VM_BUSY and DEADLINE_EXCEEDED mean something is stuck. */
const DEADLINE_MS = 20_000;

interface Lab {
  readonly server: TestServer;
  readonly names: string[];
  readonly doubles: Map<string, ChDouble>;
  readonly devices: string[];
  socket(name: string): string;
  close(): Promise<void>;
}

async function startLab(options: {
  vms: number;
  devices: number;
  /** When VM i's guest acks an unplug; undefined: never (only guestEjects). */
  ejectAfterMs: (i: number) => number | undefined;
  detachTimeoutMs?: number;
}): Promise<Lab> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "vfiod-race-"));
  const devices = Array.from({ length: options.devices }, (_, i) => `0000:${(0x21 + i).toString(16).padStart(2, "0")}:00.0`);
  const sysfs: FakeSysfs = buildFakeSysfs(devices.map((bdf, i) => ({ bdf, driver: "vfio-pci", group: 100 + i })));
  const names = Array.from({ length: options.vms }, (_, i) => `race-${i}`);
  const doubles = new Map<string, ChDouble>();
  const socket = (name: string) => path.join(dir, `${name}.sock`);
  for (const [i, name] of names.entries()) {
    const double = await ChDouble.start(socket(name), { ejectAfterMs: options.ejectAfterMs(i), sysfsRoot: sysfs.root });
    double.setState("Running");
    doubles.set(name, double);
  }
  const inventoryFile = path.join(dir, "inventory.json");
  const vms = names.map((name) => ({ name, hypervisor: "cloud-hypervisor", socket: socket(name) }));
  fs.writeFileSync(inventoryFile, JSON.stringify({ vms }));
  // Eject polling at 10 ms instead of cocoon's 100 ms keeps hundreds of Detach calls short.
  const backends = new BackendRegistry().register("cloud-hypervisor", new CloudHypervisorBackend({ pollIntervalMs: 10 }));
  const server = await startTestServer({
    inventoryFile,
    sysfsRoot: sysfs.root,
    backends,
    detachTimeoutMs: options.detachTimeoutMs,
  });
  return {
    server,
    names,
    doubles,
    devices,
    socket,
    close: async () => {
      await server.stop();
      for (const double of doubles.values()) await double.close();
      sysfs.cleanup();
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** id -> BDF; throws when an id or a device appears twice. */
function uniqueDevices(where: string, devices: { id: string; bdf: string }[]): Map<string, string> {
  const held = new Map<string, string>();
  for (const d of devices) {
    if (held.has(d.id)) throw new Error(`${where}: id ${d.id} twice`);
    if ([...held.values()].includes(d.bdf)) throw new Error(`${where}: device ${d.bdf} twice`);
    held.set(d.id, d.bdf);
  }
  return held;
}

/** What a VM holds, straight from its double's vm.info (not through vfiod): id -> BDF. */
async function heldByDouble(lab: Lab, name: string): Promise<Map<string, string>> {
  const info = await rawVmInfo(lab.socket(name));
  const devices = (info.config.devices ?? []).map((d) => ({ id: d.id ?? "", bdf: (d.path ?? "").slice(SYSFS_PREFIX.length) }));
  return uniqueDevices(`${name} config.devices`, devices);
}

/** What vfiod's List says a VM holds: id -> BDF. */
async function listed(lab: Lab, name: string): Promise<Map<string, string>> {
  const { devices } = await lab.server.client.list({ vm: name }, { timeoutMs: DEADLINE_MS });
  return uniqueDevices(`${name} List`, devices);
}

const addDevices = (double: ChDouble) => double.requests.filter((r) => r.endpoint === "vm.add-device").length;
const sorted = (m: Map<string, string>) => [...m].sort((a, b) => a[0].localeCompare(b[0]));

function refusalProblem(where: string, outcome: Outcome): string | undefined {
  return outcome.key === "OK" || isContractRefusal(outcome) ? undefined : `${where}: ${outcome.key} ${outcome.message}`;
}

const figures: string[] = [];
afterAll(() => {
  if (figures.length > 0) console.log(`vfiod race figures (seed ${SEED}):\n  ${figures.join("\n  ")}`);
});

describe("two VMs racing for one device", () => {
  let lab: Lab;
  beforeAll(async () => {
    lab = await startLab({ vms: 2, devices: 1, ejectAfterMs: () => 2 });
  });
  afterAll(async () => lab?.close());

  test("20 rounds: exactly one Attach wins, the loser is told who holds it, one add-device in total", async () => {
    const [a, b] = lab.names as [string, string];
    const [device] = lab.devices as [string];
    const tally = new Tally();
    for (let round = 0; round < 20; round++) {
      // A slow add-device on both sides: without the device lock both would pass the in-use check.
      for (const double of lab.doubles.values()) double.inject("vm.add-device", { kind: "delay", ms: 25 });
      const addsBefore = [...lab.doubles.values()].reduce((n, d) => n + addDevices(d), 0);
      const order = round % 2 === 0 ? [a, b] : [b, a];
      const results = await Promise.all(
        order.map((vm) =>
          outcomeOf(lab.server.client.attach({ vm, pci: device, id: `r${round}-${vm}` }, { timeoutMs: DEADLINE_MS })),
        ),
      );
      const winners = order.filter((_, i) => results[i]!.outcome.key === "OK");
      const losers = order.flatMap((vm, i) => (results[i]!.outcome.key === "OK" ? [] : [{ vm, ...results[i]!.outcome }]));
      expect({ round, winners: winners.length }).toEqual({ round, winners: 1 });
      const [winner] = winners as [string];
      const [loser] = losers;
      tally.add(loser!.key);
      if (loser!.key === "FAILED_PRECONDITION/DEVICE_IN_USE") {
        expect(loser!.message).toContain(`VM ${winner}`);
        expect(loser!.message).toContain(`r${round}-${winner}`);
      } else {
        // Only if it gave up waiting for the device's lock.
        expect(loser!.key).toBe("ABORTED/VM_BUSY");
      }
      const addsAfter = [...lab.doubles.values()].reduce((n, d) => n + addDevices(d), 0);
      expect({ round, adds: addsAfter - addsBefore }).toEqual({ round, adds: 1 });
      expect(sorted(await heldByDouble(lab, winner))).toEqual([[`r${round}-${winner}`, device]]);
      expect(sorted(await heldByDouble(lab, loser!.vm))).toEqual([]);
      await lab.server.client.detach({ vm: winner, id: `r${round}-${winner}` }, { timeoutMs: DEADLINE_MS });
    }
    figures.push(`device race: 20 rounds, loser outcomes: ${tally}`);
  }, 60_000);
});

describe("50 parallel Attach/Detach calls on one VM", () => {
  let lab: Lab;
  beforeAll(async () => {
    lab = await startLab({ vms: 2, devices: 5, ejectAfterMs: () => 3 });
  });
  afterAll(async () => lab?.close());

  test("4 batches: never two mutations in flight at the hypervisor; List equals the hypervisor's state, each device and id once", async () => {
    const vm = lab.names[0]!;
    const double = lab.doubles.get(vm)!;
    const watch = watchMutationOverlap(double, { mutationDelayMs: 5 });
    const ids = ["g0", "g1", "g2", "g3", "g4", "g5", ""];
    const opArb = fc.record({
      attach: fc.boolean(),
      device: fc.integer({ min: 0, max: lab.devices.length - 1 }),
      id: fc.integer({ min: 0, max: ids.length - 1 }),
      form: fc.constantFrom("full", "short", "path"),
    });
    const tally = new Tally();
    const problems: string[] = [];
    const listedIds = new Set<string>();
    for (let batch = 0; batch < 4; batch++) {
      // Ids CH chose ("_vfio3") are detachable too: take them from what is attached now.
      for (const id of (await listed(lab, vm)).keys()) listedIds.add(id);
      const ops = fc.sample(opArb, { seed: SEED + batch, numRuns: 50 });
      await Promise.all(
        ops.map(async (op, i) => {
          const bdf = lab.devices[op.device]!;
          const pci = op.form === "full" ? bdf : op.form === "short" ? bdf.slice(5) : SYSFS_PREFIX + bdf;
          const auto = [...listedIds].filter((id) => id.startsWith("_vfio"));
          const detachId = ids[op.id] || auto[i % Math.max(1, auto.length)] || "g0";
          const call = op.attach
            ? lab.server.client.attach({ vm, pci, id: ids[op.id]! }, { timeoutMs: DEADLINE_MS })
            : lab.server.client.detach({ vm, id: detachId }, { timeoutMs: DEADLINE_MS });
          const { outcome } = await outcomeOf<unknown>(call);
          tally.add(`${op.attach ? "Attach" : "Detach"} ${outcome.key}`);
          const where = op.attach ? `Attach(${pci}, ${JSON.stringify(ids[op.id])})` : `Detach(${detachId})`;
          const bad = refusalProblem(where, outcome);
          if (bad !== undefined) problems.push(bad);
          // With a 20 s deadline and a guest that ejects in 3 ms, nothing may time out or give up waiting.
          if (["ABORTED", "DEADLINE_EXCEEDED", "CANCELLED", "INTERNAL"].includes(outcome.key.split("/")[0]!)) {
            problems.push(`${where}: ${outcome.key} ${outcome.message}`);
          }
        }),
      );
      await waitFor(() => double.pendingRemovals().length === 0, "guest ejects", 10_000);
      const viaVfiod = await listed(lab, vm);
      const viaDouble = await heldByDouble(lab, vm);
      expect(sorted(viaVfiod)).toEqual(sorted(viaDouble));
      expect(new Set(viaDouble.values()).size).toBe(viaDouble.size);
      // The other VM was never touched.
      expect(sorted(await heldByDouble(lab, lab.names[1]!))).toEqual([]);
    }
    figures.push(
      `one VM, 4x50 parallel calls: ${watch.mutations()} mutating requests reached the hypervisor, ` +
        `${watch.overlaps.length} overlapped; outcomes: ${tally}`,
    );
    expect(problems).toEqual([]);
    expect(watch.overlaps).toEqual([]);
    expect(watch.mutations()).toBeGreaterThan(20);
    expect(tally.get("Attach OK")).toBeGreaterThan(5);
    expect(tally.get("Detach OK")).toBeGreaterThan(5);
  }, 60_000);
});

describe("a removal still pending in the guest", () => {
  let lab: Lab;
  beforeAll(async () => {
    // race-0's guest never acks an unplug by itself; Detach waits 200 ms.
    lab = await startLab({ vms: 2, devices: 1, ejectAfterMs: (i) => (i === 0 ? undefined : 2), detachTimeoutMs: 200 });
  });
  afterAll(async () => lab?.close());

  // After DETACH_PENDING the device is gone from race-0's config but its VFIO group
  // stays open in race-0's Cloud Hypervisor until the guest ejects (device_tree node):
  // race-0 still holds it, and a real host would refuse race-1's open with EBUSY.
  test("setup: race-0 holds the device; its Detach ends DETACH_PENDING with the removal still pending", async () => {
    const [a] = lab.names as [string, string];
    const [device] = lab.devices as [string];
    await lab.server.client.attach({ vm: a, pci: device, id: "gpu0" }, { timeoutMs: DEADLINE_MS });
    const detach = await outcomeOf(lab.server.client.detach({ vm: a, id: "gpu0" }, { timeoutMs: DEADLINE_MS }));
    expect(detach.outcome.key).toBe("DEADLINE_EXCEEDED/DETACH_PENDING");
    expect(lab.doubles.get(a)!.pendingRemovals()).toEqual(["gpu0"]);
  });

  test("Attach to another VM while the device's removal is pending is DEVICE_IN_USE, with no add-device", async () => {
    const [a, b] = lab.names as [string, string];
    const [device] = lab.devices as [string];
    const attach = await outcomeOf(lab.server.client.attach({ vm: b, pci: device, id: "gpu1" }, { timeoutMs: DEADLINE_MS }));
    expect(addDevices(lab.doubles.get(b)!)).toBe(0);
    expect(attach.outcome.key).toBe("FAILED_PRECONDITION/DEVICE_IN_USE");
    expect(attach.outcome.message).toContain(a);
  });
});

describe("soak", () => {
  const VMS = 20;
  const DEVICES = 30;
  const OPS = 1_500;
  const IN_FLIGHT = Number(process.env.VFIOD_SOAK_IN_FLIGHT ?? 16);
  let lab: Lab;
  beforeAll(async () => {
    lab = await startLab({ vms: VMS, devices: DEVICES, ejectAfterMs: (i) => 5 + ((i * 7) % 16) });
  });
  afterAll(async () => lab?.close());

  test(`${OPS} random Attach/Detach/List calls across ${VMS} VMs and ${DEVICES} devices match a model, no device on two VMs`, async () => {
    const { server, names, devices } = lab;
    const model = new Map(names.map((name) => [name, new Map<string, string>()]));
    const opArb = fc.record({
      kind: fc.constantFrom("attach", "attach", "attach", "attach", "attach", "detach", "detach", "detach", "list", "list"),
      vm: fc.integer({ min: 0, max: VMS - 1 }),
      device: fc.integer({ min: 0, max: DEVICES - 1 }),
      id: fc.oneof(fc.constant(""), fc.integer({ min: 0, max: 39 }).map((n) => `d${n}`)),
      known: fc.integer({ min: 0, max: 9 }),
      pick: fc.nat(),
    });
    const ops = fc.sample(opArb, { seed: SEED + 100, numRuns: OPS });
    const tally = new Tally();
    const problems: string[] = [];
    const started = performance.now();

    await runPool(
      ops,
      IN_FLIGHT,
      async (op) => {
        const vm = names[op.vm]!;
        const held = model.get(vm)!;
        if (op.kind === "attach") {
          const bdf = devices[op.device]!;
          const { outcome, response } = await outcomeOf(
            server.client.attach({ vm, pci: bdf, id: op.id }, { timeoutMs: DEADLINE_MS }),
          );
          tally.add(`Attach ${outcome.key}`);
          if (outcome.message.includes("Device or resource busy")) tally.add("Attach reached a busy group");
          const bad = refusalProblem(`Attach(${vm}, ${bdf}, ${op.id})`, outcome);
          if (bad !== undefined) problems.push(bad);
          if (outcome.key === "OK") {
            const device = response!.device!;
            if (device.bdf !== bdf || (op.id !== "" && device.id !== op.id)) {
              problems.push(`Attach(${vm}, ${bdf}, ${op.id}) answered ${JSON.stringify(device)}`);
            }
            held.set(device.id, device.bdf);
          } else if (!/^(ALREADY_EXISTS|FAILED_PRECONDITION)\//.test(outcome.key)) {
            // Anything else could leave the outcome unknown to the model.
            problems.push(`Attach(${vm}, ${bdf}, ${op.id}): ${outcome.key} ${outcome.message}`);
          }
        } else if (op.kind === "detach") {
          const attached = [...held.keys()];
          const id =
            op.known > 1 && attached.length > 0 ? attached[op.pick % attached.length]! : op.id === "" ? "_vfio0" : op.id;
          const { outcome } = await outcomeOf(server.client.detach({ vm, id }, { timeoutMs: DEADLINE_MS }));
          tally.add(`Detach ${outcome.key}`);
          const bad = refusalProblem(`Detach(${vm}, ${id})`, outcome);
          if (bad !== undefined) problems.push(bad);
          // DETACH_PENDING: the removal stays requested and CH has already dropped it from its config.
          if (outcome.key === "OK" || outcome.key === "DEADLINE_EXCEEDED/DETACH_PENDING") held.delete(id);
          else if (outcome.key !== "NOT_FOUND/DEVICE_NOT_ATTACHED") {
            problems.push(`Detach(${vm}, ${id}): ${outcome.key} ${outcome.message}`);
          }
        } else {
          const { outcome } = await outcomeOf(server.client.list({ vm }, { timeoutMs: DEADLINE_MS }));
          tally.add(`List ${outcome.key}`);
          if (outcome.key !== "OK") {
            problems.push(`List(${vm}): ${outcome.key} ${outcome.message}`);
          }
        }
      },
      { hangMs: DEADLINE_MS + 5_000 },
    );
    const seconds = (performance.now() - started) / 1000;

    // At the end: every VM's List equals the model and the double, and no device is on two VMs.
    await waitFor(() => [...lab.doubles.values()].every((d) => d.pendingRemovals().length === 0), "guest ejects", 10_000);
    const owners = new Map<string, string[]>();
    for (const name of names) {
      const viaVfiod = await listed(lab, name);
      const expected = new Map(model.get(name)!);
      expect({ vm: name, devices: sorted(viaVfiod) }).toEqual({ vm: name, devices: sorted(expected) });
      expect({ vm: name, devices: sorted(await heldByDouble(lab, name)) }).toEqual({ vm: name, devices: sorted(viaVfiod) });
      for (const bdf of viaVfiod.values()) owners.set(bdf, [...(owners.get(bdf) ?? []), name]);
    }
    const shared = [...owners].filter(([, vms]) => vms.length > 1);
    const attached = [...owners.keys()].length;
    // vfiod must refuse a device held by another VM itself: a double refusing the add with the
    // kernel's EBUSY (DEVICE_IN_USE carrying CH's "Device or resource busy") means vfiod let it through.
    const reachedBusyGroup = tally.get("Attach reached a busy group");
    const refusals = new Tally();
    for (const [key, n] of tally.entries()) if (!key.endsWith(" OK")) refusals.add(key.replace(/^\S+ /, ""), n);
    figures.push(
      `soak: ${ops.length} ops over ${VMS} VMs / ${DEVICES} devices, ${IN_FLIGHT} in flight, in ${seconds.toFixed(1)} s ` +
        `(${Math.round(ops.length / seconds)} ops/s); ${attached} devices attached at the end`,
      `soak successes: Attach ${tally.get("Attach OK")}, Detach ${tally.get("Detach OK")}, List ${tally.get("List OK")}`,
      `soak refusals by reason: ${refusals}`,
      `soak: Attach calls that reached a group another VM held (the double's EBUSY): ${reachedBusyGroup}`,
    );
    expect(shared).toEqual([]);
    expect(reachedBusyGroup).toBe(0);
    expect(tally.get("Attach FAILED_PRECONDITION/DEVICE_IN_USE")).toBeGreaterThan(0);
    expect(problems).toEqual([]);
    expect(tally.get("Attach OK")).toBeGreaterThan(100);
    expect(tally.get("Detach OK")).toBeGreaterThan(50);
    expect(await checkHealth(server.address, "")).toBe("SERVING");
  }, 180_000);
});
