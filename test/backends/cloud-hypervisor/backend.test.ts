// The Cloud Hypervisor backend against the double over real Unix sockets: state
// gating, conflict checks, the single add-device, the detach wait and list.
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { CloudHypervisorBackend } from "../../../src/backends/cloud-hypervisor/backend";
import { CloudHypervisorSockets } from "../../../src/backends/cloud-hypervisor/client";
import { Code, VfiodError, type Reason } from "../../../src/errors";
import type { VmRecord } from "../../../src/inventory/vm";
import { addressOfBdf } from "../../../src/pci/address";
import { rawVmInfo } from "../../support/load";
import { ChDouble, type ChDoubleOptions } from "../../support/ch-double";
import { vfiodRejection } from "../../support/rejection";

const GPU = addressOfBdf("0000:01:00.0");
const NIC = addressOfBdf("0000:02:00.0");
const PROFILES = ["v52", "v53", "main"] as const;

let dir: string;
let double: ChDouble | undefined;
let vm: VmRecord;
const backend = new CloudHypervisorBackend({ pollIntervalMs: 10 });

async function start(
  options: ChDoubleOptions = {},
  state: Parameters<ChDouble["setState"]>[0] = "Running",
): Promise<ChDouble> {
  double = await ChDouble.start(vm.socket, options);
  double.setState(state);
  return double;
}

const signal = () => AbortSignal.timeout(5000);
/**
 * Upper bound for an answer due at a 100-200 ms deadline or wait: many times (>= 4x) that,
 * for a loaded 2-core machine, yet well short of the 5 s signal and of a hang. The codes
 * and messages say which limit answered; this only says it was not held up.
 */
const PROMPT_MS = 3000;

/** Adds a device the way another CH client might, bypassing the backend. */
async function addRaw(devicePath: string, id: string): Promise<void> {
  await new CloudHypervisorSockets(30_000).client(vm.socket, vm.name).addDevice({ path: devicePath, id }, signal());
}

/** Requests the double received for `endpoint`. */
const sent = (ch: ChDouble, endpoint: string) => ch.requests.filter((r) => r.endpoint === endpoint);

async function failure(promise: Promise<unknown>, reason: Reason, code?: Code): Promise<VfiodError> {
  const error = await vfiodRejection(promise);
  expect(error.reason).toBe(reason);
  if (code !== undefined) expect(error.code).toBe(code);
  expect(error.message).toContain(vm.name);
  expect(error.message).not.toContain(dir);
  return error;
}

beforeEach(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "vfiod-"));
  vm = {
    id: "vm-1",
    name: "web1",
    hypervisor: "cloud-hypervisor",
    socket: path.join(dir, "api.sock"),
    source: "inventory",
  };
});

afterEach(async () => {
  await double?.close();
  double = undefined;
  fs.rmSync(dir, { recursive: true, force: true });
});

describe("attach", () => {
  test.each(PROFILES)("%s: attaches under CH's id, reporting host and guest addresses", async (profile) => {
    const ch = await start({ profile });
    ch.addDisk();
    expect(await backend.attach(vm, GPU, "", signal())).toEqual({
      id: "_vfio1",
      bdf: "0000:01:00.0",
      path: "/sys/bus/pci/devices/0000:01:00.0",
      guestBdf: "0000:00:02.0",
    });
    expect(sent(ch, "vm.add-device").map((r) => r.body)).toEqual([{ path: GPU.path }]);
  });

  test("attaches under the caller's id", async () => {
    const ch = await start();
    expect(await backend.attach(vm, GPU, "gpu0", signal())).toMatchObject({ id: "gpu0", guestBdf: "0000:00:01.0" });
    expect(sent(ch, "vm.add-device").map((r) => r.body)).toEqual([{ path: GPU.path, id: "gpu0" }]);
  });

  test.each(PROFILES)("%s: a retry with the same id and device returns it and sends no add-device", async (profile) => {
    const ch = await start({ profile });
    const first = await backend.attach(vm, GPU, "gpu0", signal());
    expect(await backend.attach(vm, GPU, "gpu0", signal())).toEqual(first);
    expect(sent(ch, "vm.add-device")).toHaveLength(1);
  });

  test("devices are compared by BDF, not by CH's raw path string", async () => {
    const ch = await start();
    // Added by another tool in a form CH would not see as a duplicate of GPU.path.
    await addRaw(`${GPU.path}/`, "gpu0");
    expect(await backend.attach(vm, GPU, "gpu0", signal())).toEqual({
      id: "gpu0",
      bdf: GPU.bdf,
      path: GPU.path,
      guestBdf: "0000:00:01.0",
    });
    await failure(backend.attach(vm, GPU, "gpu1", signal()), "DEVICE_ALREADY_ATTACHED");
    expect(sent(ch, "vm.add-device")).toHaveLength(1);
  });

  test("an id held by another device is ID_IN_USE and sends nothing", async () => {
    const ch = await start();
    await backend.attach(vm, NIC, "gpu0", signal());
    const error = await failure(backend.attach(vm, GPU, "gpu0", signal()), "ID_IN_USE", Code.ALREADY_EXISTS);
    expect(error.message).toContain('"gpu0"');
    expect(sent(ch, "vm.add-device")).toHaveLength(1);
  });

  test("an id held by a disk is ID_IN_USE and sends nothing", async () => {
    const ch = await start();
    ch.addDisk("data");
    await failure(backend.attach(vm, GPU, "data", signal()), "ID_IN_USE", Code.ALREADY_EXISTS);
    expect(sent(ch, "vm.add-device")).toHaveLength(0);
  });

  test("a device attached under another id is DEVICE_ALREADY_ATTACHED naming that id", async () => {
    const ch = await start();
    await backend.attach(vm, GPU, "", signal());
    const error = await failure(
      backend.attach(vm, GPU, "gpu0", signal()),
      "DEVICE_ALREADY_ATTACHED",
      Code.ALREADY_EXISTS,
    );
    expect(error.message).toContain("id=_vfio0");
    expect(sent(ch, "vm.add-device")).toHaveLength(1);
  });

  test.each(PROFILES)(
    "%s: an id whose removal is pending is ID_IN_USE saying so, and sends nothing",
    async (profile) => {
      const ch = await start({ profile });
      await backend.attach(vm, GPU, "gpu0", signal());
      await failure(backend.detach(vm, "gpu0", 0, signal()), "DETACH_PENDING");
      const error = await failure(backend.attach(vm, GPU, "gpu0", signal()), "ID_IN_USE", Code.ALREADY_EXISTS);
      expect(error.message).toContain("removal is pending");
      expect(sent(ch, "vm.add-device")).toHaveLength(1);
    },
  );

  test("a paused VM is VM_PAUSED and gets no add-device", async () => {
    const ch = await start({}, "Paused");
    const error = await failure(backend.attach(vm, GPU, "gpu0", signal()), "VM_PAUSED", Code.FAILED_PRECONDITION);
    expect(error.message).toBe("vm web1 is paused (snapshot or hibernate in flight); retry after it completes");
    expect(sent(ch, "vm.add-device")).toHaveLength(0);
  });

  test.each(["Created", "Shutdown"] as const)("a %s VM is VM_NOT_RUNNING and gets no add-device", async (state) => {
    const ch = await start({}, state);
    await failure(backend.attach(vm, GPU, "gpu0", signal()), "VM_NOT_RUNNING", Code.FAILED_PRECONDITION);
    expect(sent(ch, "vm.add-device")).toHaveLength(0);
  });

  test.each(PROFILES)("%s: no VM created is VM_NOT_RUNNING", async (profile) => {
    await start({ profile }, "none");
    await failure(backend.attach(vm, GPU, "gpu0", signal()), "VM_NOT_RUNNING", Code.FAILED_PRECONDITION);
  });

  test("add-device is sent exactly once when CH answers 500", async () => {
    const ch = await start();
    ch.inject("vm.add-device", {
      kind: "respond",
      status: 500,
      body: '["Error from API","Cannot create a VFIO device","group is not viable"]',
    });
    const error = await failure(backend.attach(vm, GPU, "gpu0", signal()), "HYPERVISOR_ERROR", Code.INTERNAL);
    expect(error.message).toContain("group is not viable");
    expect(sent(ch, "vm.add-device")).toHaveLength(1);
  });

  test("add-device is sent exactly once when the reply is lost; the device is then attached", async () => {
    const ch = await start();
    ch.inject("vm.add-device", { kind: "close-mid-response" });
    await failure(backend.attach(vm, GPU, "gpu0", signal()), "HYPERVISOR_UNAVAILABLE", Code.UNAVAILABLE);
    expect(sent(ch, "vm.add-device")).toHaveLength(1);
    // The caller's retry finds it and sends nothing.
    expect(await backend.attach(vm, GPU, "gpu0", signal())).toMatchObject({ id: "gpu0" });
    expect(sent(ch, "vm.add-device")).toHaveLength(1);
  });

  test("a full PCI segment is NO_FREE_SLOT", async () => {
    await start();
    for (let slot = 1; slot < 32; slot++)
      await backend.attach(vm, addressOfBdf(`0000:${slot.toString(16).padStart(2, "0")}:00.0`), "", signal());
    await failure(
      backend.attach(vm, addressOfBdf("0000:40:00.0"), "", signal()),
      "NO_FREE_SLOT",
      Code.RESOURCE_EXHAUSTED,
    );
  });

  test("a VM that stops running between the read and the add (CH answers 204, config only) is VM_NOT_RUNNING, config unchanged", async () => {
    const ch = await start();
    ch.inject("vm.add-device", { kind: "state-first", state: "Created" });
    const err = await failure(backend.attach(vm, GPU, "gpu0", signal()), "VM_NOT_RUNNING", Code.FAILED_PRECONDITION);
    expect(err.message).toContain("taken out again");
    // CH took the device into its config only (the 204); vfiod took it out again.
    expect(sent(ch, "vm.add-device")).toHaveLength(1);
    expect(sent(ch, "vm.remove-device").map((r) => r.body)).toEqual([{ id: "gpu0" }]);
    const info = await rawVmInfo(vm.socket);
    expect({ state: info.state, devices: info.config.devices ?? [] }).toEqual({ state: "Created", devices: [] });
  });

  test("without an id the config-only entry cannot be taken out (CH names it at boot): HYPERVISOR_ERROR saying so", async () => {
    const ch = await start();
    ch.inject("vm.add-device", { kind: "state-first", state: "Created" });
    const err = await failure(backend.attach(vm, GPU, "", signal()), "HYPERVISOR_ERROR", Code.INTERNAL);
    expect(err.message).toContain("attached at the next boot");
    expect(sent(ch, "vm.remove-device")).toEqual([]);
  });

  test("a hanging CH and a deadline give DEADLINE_EXCEEDED quickly, with nothing sent", async () => {
    const ch = await start();
    ch.inject("vm.info", { kind: "hang" });
    const started = Date.now();
    await failure(
      backend.attach(vm, GPU, "gpu0", AbortSignal.timeout(150)),
      "HYPERVISOR_UNAVAILABLE",
      Code.DEADLINE_EXCEEDED,
    );
    expect(Date.now() - started).toBeLessThan(PROMPT_MS);
    expect(sent(ch, "vm.add-device")).toEqual([]);
  });

  test("once add-device is sent, its outcome is awaited past the caller's deadline", async () => {
    const ch = await start();
    ch.inject("vm.add-device", { kind: "delay", ms: 600 });
    const started = Date.now();
    const attached = await backend.attach(vm, GPU, "gpu0", AbortSignal.timeout(150));
    expect(Date.now() - started).toBeGreaterThanOrEqual(550);
    expect(attached).toMatchObject({ id: "gpu0", bdf: GPU.bdf });
    expect(sent(ch, "vm.add-device")).toHaveLength(1);
  });
});

describe("detach", () => {
  test.each(PROFILES)("%s: waits until the guest ejects (50 ms)", async (profile) => {
    const ch = await start({ profile, ejectAfterMs: 50 });
    await backend.attach(vm, GPU, "gpu0", signal());
    const started = Date.now();
    await backend.detach(vm, "gpu0", 5000, signal());
    expect(Date.now() - started).toBeGreaterThanOrEqual(45);
    expect(sent(ch, "vm.remove-device").map((r) => r.body)).toEqual([{ id: "gpu0" }]);
    expect(await backend.list(vm, signal())).toEqual([]);
    expect(ch.pendingRemovals()).toEqual([]);
  });

  test.each(PROFILES)("%s: a guest that never ejects gives DETACH_PENDING within waitMs", async (profile) => {
    const ch = await start({ profile });
    await backend.attach(vm, GPU, "gpu0", signal());
    const started = Date.now();
    const error = await failure(backend.detach(vm, "gpu0", 200, signal()), "DETACH_PENDING", Code.DEADLINE_EXCEEDED);
    expect(Date.now() - started).toBeGreaterThanOrEqual(195);
    expect(Date.now() - started).toBeLessThan(PROMPT_MS);
    expect(error.message).toMatch(
      /the guest has not released device gpu0 within 0\.[0-9] s; its removal stays requested/,
    );
    expect(ch.pendingRemovals()).toEqual(["gpu0"]);
  });

  test.each(PROFILES)("%s: a pending removal is not sent again; a later detach waits for it", async (profile) => {
    const ch = await start({ profile });
    await backend.attach(vm, GPU, "gpu0", signal());
    await failure(backend.detach(vm, "gpu0", 0, signal()), "DETACH_PENDING");
    setTimeout(() => ch.guestEjects("gpu0"), 50);
    await backend.detach(vm, "gpu0", 5000, signal());
    expect(sent(ch, "vm.remove-device")).toHaveLength(1);
  });

  test("the caller's deadline cuts the wait short: DETACH_PENDING with DEADLINE_EXCEEDED", async () => {
    await start();
    await backend.attach(vm, GPU, "gpu0", signal());
    const started = Date.now();
    await failure(
      backend.detach(vm, "gpu0", 10_000, AbortSignal.timeout(150)),
      "DETACH_PENDING",
      Code.DEADLINE_EXCEEDED,
    );
    expect(Date.now() - started).toBeLessThan(PROMPT_MS);
  });

  test("a cancelled caller cuts the wait short: DETACH_PENDING with CANCELLED", async () => {
    await start();
    await backend.attach(vm, GPU, "gpu0", signal());
    const controller = new AbortController();
    setTimeout(() => controller.abort(), 50);
    await failure(backend.detach(vm, "gpu0", 10_000, controller.signal), "DETACH_PENDING", Code.CANCELLED);
  });

  test("an id that is not attached is DEVICE_NOT_ATTACHED and sends nothing", async () => {
    const ch = await start();
    ch.addDisk("data");
    await failure(backend.detach(vm, "gpu0", 1000, signal()), "DEVICE_NOT_ATTACHED", Code.NOT_FOUND);
    await failure(backend.detach(vm, "data", 1000, signal()), "DEVICE_NOT_ATTACHED", Code.NOT_FOUND);
    expect(sent(ch, "vm.remove-device")).toHaveLength(0);
  });

  test("a paused VM is VM_PAUSED; a VM that is not running is VM_NOT_RUNNING", async () => {
    const ch = await start();
    await backend.attach(vm, GPU, "gpu0", signal());
    ch.setState("Paused");
    await failure(backend.detach(vm, "gpu0", 1000, signal()), "VM_PAUSED", Code.FAILED_PRECONDITION);
    ch.setState("Created");
    await failure(backend.detach(vm, "gpu0", 1000, signal()), "VM_NOT_RUNNING", Code.FAILED_PRECONDITION);
    expect(sent(ch, "vm.remove-device")).toHaveLength(0);
  });

  test("CH refusing the removal is HYPERVISOR_ERROR", async () => {
    const ch = await start();
    await backend.attach(vm, GPU, "gpu0", signal());
    ch.inject("vm.remove-device", {
      kind: "respond",
      status: 500,
      body: '["Error from API","The device could not be removed from the VM"]',
    });
    await failure(backend.detach(vm, "gpu0", 1000, signal()), "HYPERVISOR_ERROR", Code.INTERNAL);
  });
});

describe("list", () => {
  test.each(PROFILES)("%s: config.devices in CH's order with host and guest addresses", async (profile) => {
    const ch = await start({ profile });
    ch.addDisk();
    await backend.attach(vm, NIC, "nic", signal());
    await backend.attach(vm, GPU, "", signal());
    expect(await backend.list(vm, signal())).toEqual([
      { id: "nic", bdf: NIC.bdf, path: NIC.path, guestBdf: "0000:00:02.0" },
      { id: "_vfio1", bdf: GPU.bdf, path: GPU.path, guestBdf: "0000:00:03.0" },
    ]);
  });

  test("paths CH echoes as sent are read as PCI addresses where they parse", async () => {
    await start();
    // Added by another tool, in forms vfiod itself never sends.
    await addRaw(`${GPU.path}/`, "slash");
    await addRaw("/srv/passthrough/gpu", "odd");
    expect(await backend.list(vm, signal())).toEqual([
      { id: "slash", bdf: GPU.bdf, path: GPU.path, guestBdf: "0000:00:01.0" },
      { id: "odd", bdf: "", path: "/srv/passthrough/gpu", guestBdf: "0000:00:02.0" },
    ]);
  });

  test("a device whose removal is pending stays listed (still held) until the guest ejects it", async () => {
    const ch = await start();
    const attached = await backend.attach(vm, GPU, "gpu0", signal());
    await failure(backend.detach(vm, "gpu0", 0, signal()), "DETACH_PENDING");
    expect(ch.pendingRemovals()).toEqual(["gpu0"]);
    expect(await backend.list(vm, signal())).toEqual([attached]);
    const other = await failure(backend.attach(vm, GPU, "gpu1", signal()), "DEVICE_ALREADY_ATTACHED");
    expect(other.message).toContain("removal is pending");
    ch.guestEjects("gpu0");
    expect(await backend.list(vm, signal())).toEqual([]);
    expect(sent(ch, "vm.add-device")).toHaveLength(1);
  });

  test.each(["Created", "Paused", "Shutdown"] as const)("works in state %s", async (state) => {
    const ch = await start();
    await backend.attach(vm, GPU, "gpu0", signal());
    ch.setState(state);
    const [device] = await backend.list(vm, signal());
    expect(device).toMatchObject({ id: "gpu0", bdf: GPU.bdf, guestBdf: state === "Created" ? "" : "0000:00:01.0" });
  });

  test.each(PROFILES)("%s: no VM created lists nothing", async (profile) => {
    await start({ profile }, "none");
    expect(await backend.list(vm, signal())).toEqual([]);
  });

  test("an unreachable hypervisor is HYPERVISOR_UNAVAILABLE", async () => {
    await failure(backend.list(vm, signal()), "HYPERVISOR_UNAVAILABLE", Code.UNAVAILABLE);
  });
});
