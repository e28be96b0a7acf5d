import * as grpc from "@grpc/grpc-js";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { AuditLog } from "../../src/audit";
import { VfiodError } from "../../src/errors";
import { DeviceAllowList } from "../../src/host/device-allow-list";
import { parsePciAddress } from "../../src/pci/address";
import { ChDouble } from "../support/ch-double";
import { buildFakeSysfs, type FakeSysfs } from "../support/fake-sysfs";
import { failure, startTestServer, type TestServer } from "../support/test-server";

describe("DeviceAllowList.parse", () => {
  test.each(["", " , ", "10de", "xyz:1234", "10de:12345", "01:20.0", "/etc/passwd"])("refuses %j", (list) => {
    expect(() => DeviceAllowList.parse(list, "/")).toThrow(/--allow-devices/);
  });
});

describe("DeviceAllowList.check", () => {
  let sysfs: FakeSysfs;
  beforeAll(() => {
    sysfs = buildFakeSysfs([
      { bdf: "0000:01:00.0", vendor: "0x10de", device: "0x2204" },
      { bdf: "0000:02:00.0", vendor: "0x8086", device: "0x10d3" },
    ]);
  });
  afterAll(() => sysfs.cleanup());

  const reason = async (list: string, bdf: string) =>
    DeviceAllowList.parse(list, sysfs.root)
      .check(parsePciAddress(bdf))
      .then(
        () => "allowed",
        (err: unknown) => (err instanceof VfiodError ? err.reason : String(err)),
      );

  test.each([
    ["10de:*", "01:00.0", "allowed"],
    ["10DE:2204", "01:00.0", "allowed"],
    ["*:10d3", "02:00.0", "allowed"],
    ["*:*", "02:00.0", "allowed"],
    ["10de:*", "02:00.0", "DEVICE_NOT_ALLOWED"],
    ["0000:02:00.0", "02:00.0", "allowed"],
    ["02:00.0", "/sys/bus/pci/devices/0000:02:00.0", "allowed"],
    ["01:00.0", "02:00.0", "DEVICE_NOT_ALLOWED"],
    ["10de:*", "09:00.0", "DEVICE_NOT_ALLOWED"],
  ])("list %j, device %j: %s", async (list, bdf, expected) => {
    expect(await reason(list, bdf)).toBe(expected);
  });
});

describe("through gRPC: refused before preflight and before any hypervisor request", () => {
  let dir: string;
  let sysfs: FakeSysfs;
  let ch: ChDouble;
  let server: TestServer;
  let auditFile: string;

  beforeAll(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), "vfiod-allow-"));
    sysfs = buildFakeSysfs([
      { bdf: "0000:01:00.0", driver: "vfio-pci", group: 1, vendor: "0x10de" },
      { bdf: "0000:02:00.0", driver: "e1000e", group: 2, vendor: "0x8086", device: "0x10d3" },
    ]);
    ch = await ChDouble.start(path.join(dir, "ch.sock"));
    ch.setState("Running");
    const inventoryFile = path.join(dir, "inventory.json");
    fs.writeFileSync(inventoryFile, JSON.stringify({ vms: [{ name: "vm", hypervisor: "cloud-hypervisor", socket: path.join(dir, "ch.sock") }] }));
    auditFile = path.join(dir, "audit.log");
    server = await startTestServer({
      inventoryFile,
      sysfsRoot: sysfs.root,
      allowList: DeviceAllowList.parse("10de:*", sysfs.root),
      server: { audit: AuditLog.open(auditFile) },
    });
  });
  afterAll(async () => {
    // Also after a failed beforeAll: tear down only what was set up.
    await server?.stop();
    await ch?.close();
    sysfs?.cleanup();
    if (dir !== undefined) fs.rmSync(dir, { recursive: true, force: true });
  });

  test("a device outside the list is PERMISSION_DENIED even though preflight would refuse it too", async () => {
    const before = ch.requests.length;
    const err = await failure(server.client.attach({ vm: "vm", pci: "02:00.0", id: "nic0" }));
    expect(err).toMatchObject({ code: grpc.status.PERMISSION_DENIED, reason: "DEVICE_NOT_ALLOWED" });
    expect(ch.requests.slice(before)).toEqual([]);
  });

  test("a BDF-only list refuses without reading sysfs at all", async () => {
    const bdfOnly = await startTestServer({
      inventoryFile: path.join(dir, "inventory.json"),
      sysfsRoot: path.join(dir, "no-such-sysfs"),
      allowList: DeviceAllowList.parse("0000:01:00.0", path.join(dir, "no-such-sysfs")),
    });
    try {
      const err = await failure(bdfOnly.client.attach({ vm: "vm", pci: "02:00.0", id: "" }));
      expect(err).toMatchObject({ code: grpc.status.PERMISSION_DENIED, reason: "DEVICE_NOT_ALLOWED" });
    } finally {
      await bdfOnly.stop();
    }
  });

  test("an allowed device attaches, and the audit log has a line for the success and for the refusal", async () => {
    // Its own refusal: the test must not rely on another test having run first.
    expect(await failure(server.client.attach({ vm: "vm", pci: "02:00.0", id: "nic0" }))).toMatchObject({
      reason: "DEVICE_NOT_ALLOWED",
    });
    const { device } = await server.client.attach({ vm: "vm", pci: "01:00.0", id: "gpu0" });
    expect(device?.id).toBe("gpu0");
    const lines = fs.readFileSync(auditFile, "utf8").trim().split("\n").map((l) => JSON.parse(l) as Record<string, unknown>);
    expect(lines).toEqual(
      expect.arrayContaining([
        expect.objectContaining({ method: "Attach", vm: "vm", device: "02:00.0", outcome: "DEVICE_NOT_ALLOWED", code: 7 }),
        expect.objectContaining({ method: "Attach", vm: "vm", device: "01:00.0", id: "gpu0", outcome: "OK", code: 0 }),
      ]),
    );
    for (const line of lines) {
      expect(line.time).toMatch(/^\d{4}-\d\d-\d\dT/);
      expect(line.caller).toMatch(/^ipv4:127\.0\.0\.1:\d+$|^127\.0\.0\.1:\d+$/);
    }
  });
});
