// DeviceService over real gRPC, against Cloud Hypervisor doubles on real Unix
// sockets, a fake sysfs tree and a static inventory: the contract's paths and
// every refusal, with what (if anything) reached the hypervisor.
import * as grpc from "@grpc/grpc-js";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { ChDouble, type ChVmState } from "../support/ch-double";
import { buildFakeSysfs, type FakeSysfs } from "../support/fake-sysfs";
import { failure, startTestServer, type TestServer } from "../support/test-server";
import { capturingLogger } from "../support/log-capture";
import { waitFor } from "../support/wait";

let dir: string;
let sysfs: FakeSysfs;
let server: TestServer;
const doubles = new Map<string, ChDouble>();

async function chVm(name: string, state: ChVmState): Promise<{ name: string; hypervisor: string; socket: string }> {
  const socket = path.join(dir, `${name}.sock`);
  const double = await ChDouble.start(socket);
  double.setState(state);
  doubles.set(name, double);
  return { name, hypervisor: "cloud-hypervisor", socket };
}

const ch = (name: string) => doubles.get(name)!;
const addDeviceRequests = (name: string) => ch(name).requests.filter((r) => r.endpoint === "vm.add-device");

beforeEach(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "vfiod-svc-"));
  sysfs = buildFakeSysfs([
    { bdf: "0000:01:00.0", driver: "vfio-pci", group: 12 },
    { bdf: "0000:01:00.1", driver: "vfio-pci", group: 12 },
    { bdf: "0000:02:00.0", driver: "nvidia", group: 13 },
    { bdf: "0000:04:00.0", driver: "vfio-pci", group: 15 },
    { bdf: "0000:04:00.1", driver: "snd_hda_intel", group: 15 },
  ]);
  const vms = [
    await chVm("gpu-vm", "Running"),
    await chVm("paused-vm", "Paused"),
    await chVm("created-vm", "Created"),
    { name: "fc-vm", hypervisor: "firecracker", socket: path.join(dir, "fc.sock") },
    { name: "bhyve-vm", hypervisor: "bhyve", socket: path.join(dir, "bhyve.sock") },
  ];
  const inventoryFile = path.join(dir, "inventory.json");
  fs.writeFileSync(inventoryFile, JSON.stringify({ vms }));
  server = await startTestServer({ inventoryFile, sysfsRoot: sysfs.root });
});

afterEach(async () => {
  await server.stop();
  for (const double of doubles.values()) await double.close();
  doubles.clear();
  sysfs.cleanup();
  fs.rmSync(dir, { recursive: true, force: true });
});

describe("attach, list, detach", () => {
  test.each(["01:00.0", "0000:01:00.0", "/sys/bus/pci/devices/0000:01:00.0", " /sys/bus/pci/devices/0000:01:00.0/ "])(
    "Attach %j reaches the hypervisor as the canonical path; List shows it; Detach removes it",
    async (pci) => {
      const { client } = server;
      const { device } = await client.attach({ vm: "gpu-vm", pci, id: "gpu0" });
      expect(device).toMatchObject({ id: "gpu0", bdf: "0000:01:00.0", path: "/sys/bus/pci/devices/0000:01:00.0" });
      expect(device?.guestBdf).toMatch(/^0000:00:[0-1][0-9a-f]\.0$/);
      expect(addDeviceRequests("gpu-vm").map((r) => r.body)).toEqual([
        { id: "gpu0", path: "/sys/bus/pci/devices/0000:01:00.0" },
      ]);

      const listed = await client.list({ vm: "gpu-vm" });
      expect(listed.devices.map((d) => ({ id: d.id, bdf: d.bdf, guestBdf: d.guestBdf }))).toEqual([
        { id: "gpu0", bdf: "0000:01:00.0", guestBdf: device?.guestBdf },
      ]);

      const detaching = client.detach({ vm: "gpu-vm", id: "gpu0" });
      await waitFor(() => ch("gpu-vm").pendingRemovals().includes("gpu0"), "the removal is requested");
      ch("gpu-vm").guestEjects("gpu0");
      await detaching;
      expect((await client.list({ vm: "gpu-vm" })).devices).toEqual([]);
    },
  );

  test("Attach without an id returns the id Cloud Hypervisor chose", async () => {
    const { device } = await server.client.attach({ vm: "gpu-vm", pci: "01:00.1", id: "" });
    expect(device?.id).toMatch(/^_vfio\d+$/);
    expect(addDeviceRequests("gpu-vm").map((r) => r.body)).toEqual([{ path: "/sys/bus/pci/devices/0000:01:00.1" }]);
  });

  test("the same id and device again is an idempotent OK that sends nothing", async () => {
    const first = await server.client.attach({ vm: "gpu-vm", pci: "01:00.0", id: "gpu0" });
    const again = await server.client.attach({ vm: "gpu-vm", pci: "/sys/bus/pci/devices/0000:01:00.0", id: "gpu0" });
    expect(again.device).toEqual(first.device);
    expect(addDeviceRequests("gpu-vm")).toHaveLength(1);
  });

  test("List of a VM is found by its name; Firecracker lists nothing", async () => {
    expect((await server.client.list({ vm: "gpu-vm" })).devices).toEqual([]);
    expect((await server.client.list({ vm: "fc-vm" })).devices).toEqual([]);
  });

  test("Detach that the guest never acknowledges answers DETACH_PENDING, and List tells the truth", async () => {
    await server.client.attach({ vm: "gpu-vm", pci: "01:00.0", id: "gpu0" });
    const started = Date.now();
    const err = await failure(server.client.detach({ vm: "gpu-vm", id: "gpu0" }));
    expect(err).toMatchObject({ code: grpc.status.DEADLINE_EXCEEDED, reason: "DETACH_PENDING" });
    expect(Date.now() - started).toBeLessThan(5000);
    expect(ch("gpu-vm").pendingRemovals()).toEqual(["gpu0"]);
    const removes = () => ch("gpu-vm").requests.filter((r) => r.endpoint === "vm.remove-device").length;
    expect(removes()).toBe(1);
    // A retry waits again without sending a second removal, and completes once the guest lets go.
    const retry = server.client.detach({ vm: "gpu-vm", id: "gpu0" });
    setTimeout(() => ch("gpu-vm").guestEjects("gpu0"), 200);
    await retry;
    expect(removes()).toBe(1);
  });
});

describe("refusals (contract.md status table)", () => {
  const noRequestsTo = (name: string) => expect(ch(name).requests).toEqual([]);

  test.each([
    ["empty pci", { pci: "" }],
    ["garbage pci", { pci: "not-a-device" }],
    ["arbitrary host path", { pci: "/etc/passwd" }],
    ["path escaping sysfs", { pci: "/sys/bus/pci/devices/../../../../dev/sda" }],
    ["device number above 1f", { pci: "01:20.0" }],
    ["bad id", { id: "has space" }],
    ["reserved id", { id: "cocoon-gpu" }],
    ["empty vm", { vm: "" }],
  ])("%s is INVALID_ARGUMENT and the hypervisor hears nothing", async (_name, change) => {
    const request = { vm: "gpu-vm", pci: "01:00.0", id: "gpu0", ...change };
    expect(await failure(server.client.attach(request))).toMatchObject({
      code: grpc.status.INVALID_ARGUMENT,
      reason: "INVALID_ARGUMENT",
    });
    noRequestsTo("gpu-vm");
  });

  test("Detach without an id is INVALID_ARGUMENT", async () => {
    expect(await failure(server.client.detach({ vm: "gpu-vm", id: "" }))).toMatchObject({
      code: grpc.status.INVALID_ARGUMENT,
      reason: "INVALID_ARGUMENT",
    });
    noRequestsTo("gpu-vm");
  });

  test("an unknown VM is NOT_FOUND (VM_NOT_FOUND)", async () => {
    expect(await failure(server.client.attach({ vm: "nope", pci: "01:00.0", id: "" }))).toMatchObject({
      code: grpc.status.NOT_FOUND,
      reason: "VM_NOT_FOUND",
    });
    expect(await failure(server.client.list({ vm: "nope" }))).toMatchObject({ reason: "VM_NOT_FOUND" });
  });

  test("a VM that is created but not booted is VM_NOT_RUNNING, with no add-device", async () => {
    expect(await failure(server.client.attach({ vm: "created-vm", pci: "01:00.0", id: "" }))).toMatchObject({
      code: grpc.status.FAILED_PRECONDITION,
      reason: "VM_NOT_RUNNING",
    });
    expect(addDeviceRequests("created-vm")).toEqual([]);
  });

  test("a paused VM is VM_PAUSED, with no add-device", async () => {
    expect(await failure(server.client.attach({ vm: "paused-vm", pci: "01:00.0", id: "" }))).toMatchObject({
      code: grpc.status.FAILED_PRECONDITION,
      reason: "VM_PAUSED",
    });
    expect(addDeviceRequests("paused-vm")).toEqual([]);
  });

  test("a Firecracker VM is UNIMPLEMENTED: backend does not support device attach", async () => {
    const attach = await failure(server.client.attach({ vm: "fc-vm", pci: "01:00.0", id: "" }));
    expect(attach).toMatchObject({ code: grpc.status.UNIMPLEMENTED, reason: "BACKEND_UNSUPPORTED" });
    expect(attach.message).toContain("backend does not support device attach");
    const detach = await failure(server.client.detach({ vm: "fc-vm", id: "x" }));
    expect(detach).toMatchObject({ code: grpc.status.UNIMPLEMENTED, reason: "BACKEND_UNSUPPORTED" });
  });

  test("an inventory entry naming a hypervisor type vfiod has no backend for is refused when the file is read", async () => {
    // The same file, served by a vfiod whose log the test reads.
    const { log, lines } = capturingLogger();
    const logged = await startTestServer({ inventoryFile: path.join(dir, "inventory.json"), sysfsRoot: sysfs.root, log });
    try {
      const err = await failure(logged.client.attach({ vm: "bhyve-vm", pci: "01:00.0", id: "" }));
      expect(err).toMatchObject({ code: grpc.status.NOT_FOUND, reason: "VM_NOT_FOUND" });
      // The file's other VMs are served.
      expect((await logged.client.list({ vm: "gpu-vm" })).devices).toEqual([]);
      await logged.client.list({ vm: "gpu-vm" });
      const refused = lines.filter((l) => l.msg.startsWith("inventory entry refused"));
      expect(refused).toEqual([
        expect.objectContaining({ path: path.join(dir, "inventory.json"), why: expect.stringContaining('"bhyve-vm": unknown hypervisor "bhyve"') }),
      ]);
    } finally {
      await logged.stop();
    }
  });


  test("a missing host device is NOT_FOUND (DEVICE_NOT_FOUND), hypervisor untouched", async () => {
    expect(await failure(server.client.attach({ vm: "gpu-vm", pci: "09:00.0", id: "" }))).toMatchObject({
      code: grpc.status.NOT_FOUND,
      reason: "DEVICE_NOT_FOUND",
    });
    noRequestsTo("gpu-vm");
  });

  test("a device on another driver is DEVICE_NOT_VFIO naming the driver, hypervisor untouched", async () => {
    const err = await failure(server.client.attach({ vm: "gpu-vm", pci: "02:00.0", id: "" }));
    expect(err).toMatchObject({ code: grpc.status.FAILED_PRECONDITION, reason: "DEVICE_NOT_VFIO" });
    expect(err.message).toContain("nvidia");
    noRequestsTo("gpu-vm");
  });

  test("a group with a host-driver companion is IOMMU_GROUP_NOT_VIABLE naming it, hypervisor untouched", async () => {
    const err = await failure(server.client.attach({ vm: "gpu-vm", pci: "04:00.0", id: "" }));
    expect(err).toMatchObject({ code: grpc.status.FAILED_PRECONDITION, reason: "IOMMU_GROUP_NOT_VIABLE" });
    expect(err.message).toContain("0000:04:00.1 (driver snd_hda_intel)");
    noRequestsTo("gpu-vm");
  });

  test("an id used by another device is ALREADY_EXISTS (ID_IN_USE); no second add-device", async () => {
    await server.client.attach({ vm: "gpu-vm", pci: "01:00.0", id: "gpu0" });
    expect(await failure(server.client.attach({ vm: "gpu-vm", pci: "01:00.1", id: "gpu0" }))).toMatchObject({
      code: grpc.status.ALREADY_EXISTS,
      reason: "ID_IN_USE",
    });
    expect(addDeviceRequests("gpu-vm")).toHaveLength(1);
  });

  test("a device attached under another id is ALREADY_EXISTS (DEVICE_ALREADY_ATTACHED)", async () => {
    await server.client.attach({ vm: "gpu-vm", pci: "01:00.0", id: "gpu0" });
    const err = await failure(server.client.attach({ vm: "gpu-vm", pci: "01:00.0", id: "gpu1" }));
    expect(err).toMatchObject({ code: grpc.status.ALREADY_EXISTS, reason: "DEVICE_ALREADY_ATTACHED" });
    expect(err.message).toContain("gpu0");
    expect(addDeviceRequests("gpu-vm")).toHaveLength(1);
  });

  test("Detach of an id that is not attached is NOT_FOUND (DEVICE_NOT_ATTACHED), nothing removed", async () => {
    expect(await failure(server.client.detach({ vm: "gpu-vm", id: "ghost" }))).toMatchObject({
      code: grpc.status.NOT_FOUND,
      reason: "DEVICE_NOT_ATTACHED",
    });
    expect(ch("gpu-vm").requests.filter((r) => r.endpoint === "vm.remove-device")).toEqual([]);
  });

  test("a hypervisor whose socket is gone is UNAVAILABLE (HYPERVISOR_UNAVAILABLE)", async () => {
    await ch("gpu-vm").close();
    fs.rmSync(path.join(dir, "gpu-vm.sock"), { force: true });
    expect(await failure(server.client.list({ vm: "gpu-vm" }))).toMatchObject({
      code: grpc.status.UNAVAILABLE,
      reason: "HYPERVISOR_UNAVAILABLE",
    });
  });

  test("a Cloud Hypervisor 500 is INTERNAL (HYPERVISOR_ERROR) with its text", async () => {
    ch("gpu-vm").inject("vm.add-device", {
      kind: "respond",
      status: 500,
      body: '["Error from API","The device could not be added to the VM","Error from device manager","Cannot create a VFIO device","group is not viable"]',
    });
    const err = await failure(server.client.attach({ vm: "gpu-vm", pci: "01:00.0", id: "gpu0" }));
    expect(err).toMatchObject({ code: grpc.status.INTERNAL, reason: "HYPERVISOR_ERROR" });
    expect(err.message).toContain("Cannot create a VFIO device");
    expect(addDeviceRequests("gpu-vm")).toHaveLength(1);
  });
});

test("a caller's deadline reaches the hypervisor call: a hung Cloud Hypervisor gives DEADLINE_EXCEEDED in time", async () => {
  ch("gpu-vm").inject("vm.info", { kind: "hang" });
  const started = Date.now();
  const err = await failure(server.client.list({ vm: "gpu-vm" }, { timeoutMs: 300 }));
  expect(err.code).toBe(grpc.status.DEADLINE_EXCEEDED);
  expect(Date.now() - started).toBeLessThan(2000);
});
