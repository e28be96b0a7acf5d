import * as grpc from "@grpc/grpc-js";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { AuditLog } from "../../src/audit";
import { Code, VfiodError } from "../../src/errors";
import { DeviceAllowList } from "../../src/host/device-allow-list";
import { parsePciAddress } from "../../src/pci/address";
import { ChDouble } from "../support/ch-double";
import { buildFakeSysfs, type FakeSysfs } from "../support/fake-sysfs";
import { vfiodRejection } from "../support/rejection";
import { failure, startTestServer, type TestServer } from "../support/test-server";

/** The message of the usage error parse throws; a VfiodError or no throw fails the test. */
function parseError(list: string): string {
  try {
    DeviceAllowList.parse(list, "/");
  } catch (err) {
    if (err instanceof Error && !(err instanceof VfiodError) && err.constructor === Error) return err.message;
    throw err;
  }
  throw new Error(`accepted ${JSON.stringify(list)}`);
}

describe("DeviceAllowList.parse", () => {
  test.each(["", " , ", ",", " "])("refuses the empty list %j", (list) => {
    expect(parseError(list)).toBe("--allow-devices: the list is empty");
  });

  test.each([
    ["10de", "10de"],
    ["xyz:1234", "xyz:1234"],
    ["10de:12345", "10de:12345"],
    ["110de:2204", "110de:2204"],
    ["10d:2204", "10d:2204"],
    ["0x10de:*", "0x10de:*"],
    ["10de:*:*", "10de:*:*"],
    ["10de:2204 8086:10d3", "10de:2204 8086:10d3"],
    ["01:20.0", "01:20.0"],
    ["/etc/passwd", "/etc/passwd"],
    // One bad entry spoils the list; the message quotes it as typed.
    ["10de:*, bogus ", " bogus "],
    ["01:00.0,/sys/bus/usb/devices/0000:01:00.0", "/sys/bus/usb/devices/0000:01:00.0"],
  ])("refuses %j, naming %j", (list, entry) => {
    expect(parseError(list)).toBe(`--allow-devices: ${JSON.stringify(entry)} is neither vendor:device (hex, * wildcard) nor a BDF`);
  });

  // --manage-binding refuses a list that lets every device through.
  test.each([
    ["*:*", true],
    ["10de:2204, *:*", true],
    ["*:2204", false],
    ["10de:*", false],
    ["10de:2204", false],
    ["0000:01:00.0", false],
  ])("%j allows any device: %j", (list, any) => {
    expect(DeviceAllowList.parse(list, "/").allowsAnyDevice()).toBe(any);
  });
});

describe("DeviceAllowList.check", () => {
  let sysfs: FakeSysfs;
  beforeAll(() => {
    sysfs = buildFakeSysfs([
      { bdf: "0000:01:00.0", vendor: "0x10de", device: "0x2204" },
      { bdf: "0000:02:00.0", vendor: "0x8086", device: "0x10d3" },
      // Not what the kernel writes, but read the same: upper case, no leading zeros.
      { bdf: "0000:03:00.0", vendor: "0x1AF4", device: "0X1041" },
      { bdf: "0000:04:00.0", vendor: "0xde", device: "10" },
      // Garbage: only a leading "0x" is dropped, so this never reads as 0010.
      { bdf: "0000:05:00.0", vendor: "100x", device: "0x2204" },
      // Its device file is removed below.
      { bdf: "0000:06:00.0", vendor: "0x10de", device: "0x2204" },
    ]);
    fs.rmSync(path.join(sysfs.root, "sys/bus/pci/devices/0000:06:00.0/device"));
  });
  afterAll(() => sysfs?.cleanup());

  const check = (list: string, pci: string) => DeviceAllowList.parse(list, sysfs.root).check(parsePciAddress(pci));

  test.each([
    ["10de:*", "01:00.0"],
    ["10DE:2204", "01:00.0"],
    ["*:10d3", "02:00.0"],
    ["*:*", "02:00.0"],
    ["10de:*,8086:*", "02:00.0"],
    ["8086:*,10de:*", "01:00.0"],
    [" 10de:2204 , 01:00.0 ", "01:00.0"],
    ["10de:2204,", "01:00.0"],
    [",,10de:2204", "01:00.0"],
    ["1234:5678,,8086:10d3", "02:00.0"],
    ["0000:02:00.0", "02:00.0"],
    ["02:00.0", "/sys/bus/pci/devices/0000:02:00.0"],
    ["/sys/bus/pci/devices/0000:02:00.0", "02:00.0"],
    ["01:00.0,02:00.0", "02:00.0"],
    ["01:00.0, 02:00.0", "02:00.0"],
    // A listed BDF is allowed without reading sysfs, so it need not be there.
    ["0000:09:00.0", "09:00.0"],
    ["1af4:1041", "03:00.0"],
    ["00de:0010", "04:00.0"],
  ])("list %j allows %j", async (list, pci) => {
    await expect(check(list, pci)).resolves.toBeUndefined();
  });

  test.each([
    ["10de:*", "02:00.0", " (8086:10d3)"],
    ["10de:2205", "01:00.0", " (10de:2204)"],
    ["10df:2204", "01:00.0", " (10de:2204)"],
    ["*:2205", "01:00.0", " (10de:2204)"],
    ["*:2204", "02:00.0", " (8086:10d3)"],
    ["10de:*,8086:1234", "02:00.0", " (8086:10d3)"],
    ["1234:10d3,8086:5678", "02:00.0", " (8086:10d3)"],
    ["0010:*", "05:00.0", " (100x:2204)"],
    // A BDF-only list never reads sysfs: the message has no vendor:device.
    ["01:00.0", "02:00.0", ""],
    ["01:00.0", "09:00.0", ""],
    ["10de:*", "09:00.0", " (its vendor:device cannot be read)"],
    ["*:*", "06:00.0", " (its vendor:device cannot be read)"],
  ])("list %j refuses %j%s", async (list, pci, why) => {
    const err = await vfiodRejection(check(list, pci));
    const bdf = parsePciAddress(pci).bdf;
    expect(err.reason).toBe("DEVICE_NOT_ALLOWED");
    expect(err.code).toBe(Code.PERMISSION_DENIED);
    expect(err.message).toBe(`host PCI device ${bdf} is not in vfiod's --allow-devices list${why}`);
    expect(err.meta).toEqual({ device: bdf });
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
        expect.objectContaining({ method: "Attach", vmRef: "vm", device: "0000:02:00.0", outcome: "DEVICE_NOT_ALLOWED", code: 7 }),
        expect.objectContaining({ method: "Attach", vm: "vm", device: "0000:01:00.0", id: "gpu0", outcome: "OK", code: 0 }),
      ]),
    );
    for (const line of lines) {
      expect(line.time).toMatch(/^\d{4}-\d\d-\d\dT/);
      expect(line.caller).toMatch(/^ipv4:127\.0\.0\.1:\d+$|^127\.0\.0\.1:\d+$/);
    }
  });
});
