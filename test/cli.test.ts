// vfiodctl, the real built binary, against a vfiod server and a Cloud Hypervisor double.
import { execFile, spawn } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import readline from "node:readline";
import { promisify } from "node:util";
import { ChDouble } from "./support/ch-double";
import { buildFakeSysfs, type FakeSysfs } from "./support/fake-sysfs";
import { startTestServer, type TestServer } from "./support/test-server";
import { CLI_JS } from "./support/vfiod-process";
import { waitFor } from "./support/wait";

let dir: string;
let sysfs: FakeSysfs;
let ch: ChDouble;
let server: TestServer;

beforeAll(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "vfiod-cli-"));
  sysfs = buildFakeSysfs([
    // A GPU and its audio function in one IOMMU group, both on vfio-pci: a whole-group attach takes both.
    { bdf: "0000:01:00.0", driver: "vfio-pci", group: 1 },
    { bdf: "0000:01:00.1", driver: "vfio-pci", group: 1, pciClass: "0x040300", device: "0x1aef" },
    // A NIC whose second function is on no driver: the group is viable, a whole-group attach is refused.
    { bdf: "0000:02:00.0", driver: "vfio-pci", group: 2, pciClass: "0x020000", vendor: "0x8086", device: "0x10fb" },
    { bdf: "0000:02:00.1", group: 2, pciClass: "0x020000", vendor: "0x8086", device: "0x10fb" },
  ]);
  fs.writeFileSync(path.join(sysfs.root, "sys/bus/pci/devices/0000:01:00.0/numa_node"), "0\n");
  ch = await ChDouble.start(path.join(dir, "ch.sock"), { ejectAfterMs: 10 });
  ch.setState("Running");
  const inventoryFile = path.join(dir, "inventory.json");
  const vms = [
    { name: "vm", hypervisor: "cloud-hypervisor", socket: path.join(dir, "ch.sock") },
    // Its state is long: "unreachable: " and why.
    { name: "gone", hypervisor: "cloud-hypervisor", socket: path.join(dir, "gone.sock") },
  ];
  fs.writeFileSync(inventoryFile, JSON.stringify({ vms }));
  server = await startTestServer({ inventoryFile, sysfsRoot: sysfs.root });
});

afterAll(async () => {
  await server.stop();
  await ch.close();
  sysfs.cleanup();
  fs.rmSync(dir, { recursive: true, force: true });
});

/** Where no vfiod serves (a later --address wins over vfiodctl()'s). */
const NOWHERE = ["--address", "unix:/nonexistent/vfiod.sock"];

const addDeviceRequests = () => ch.requests.filter((r) => r.endpoint === "vm.add-device").length;

async function vfiodctl(...args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  try {
    const { stdout, stderr } = await promisify(execFile)(process.execPath, [CLI_JS, "--address", server.address, ...args], {
      timeout: 20_000,
    });
    return { code: 0, stdout, stderr };
  } catch (err) {
    const e = err as { code: number; stdout: string; stderr: string };
    return { code: e.code, stdout: e.stdout, stderr: e.stderr };
  }
}

test("attach, list (table and JSON) and detach", async () => {
  const attached = await vfiodctl("--json", "attach", "vm", "01:00.0", "--id", "gpu0");
  expect(attached.code).toBe(0);
  expect(JSON.parse(attached.stdout)).toEqual([
    expect.objectContaining({ id: "gpu0", bdf: "0000:01:00.0", path: "/sys/bus/pci/devices/0000:01:00.0" }),
  ]);
  const table = await vfiodctl("list", "vm");
  expect(table.stdout.split("\n")[0]).toMatch(/^ID\s+HOST BDF\s+GUEST BDF$/);
  expect(table.stdout).toMatch(/^gpu0\s+0000:01:00\.0\s+0000:00:\w\w\.0$/m);
  expect((await vfiodctl("detach", "vm", "gpu0")).stdout).toBe("detached gpu0 from vm\n");
  expect((await vfiodctl("list", "vm")).stdout).toBe("no VFIO devices attached\n");
});

test("a refused call exits 1 and prints code, reason and message", async () => {
  const plain = await vfiodctl("attach", "vm", "/etc/passwd");
  expect(plain.code).toBe(1);
  expect(plain.stderr).toMatch(/^error: INVALID_ARGUMENT INVALID_ARGUMENT: pci "\/etc\/passwd" invalid/);
  const json = await vfiodctl("--json", "list", "nope");
  expect(json.code).toBe(1);
  expect(JSON.parse(json.stdout)).toEqual({ error: expect.objectContaining({ code: "NOT_FOUND", reason: "VM_NOT_FOUND" }) });
});

test("attach --managed asks for managed binding: this vfiod runs without --manage-binding, so BINDING_DISABLED, exit 1, nothing sent", async () => {
  const before = ch.requests.length;
  const { code, stderr } = await vfiodctl("attach", "vm", "01:00.0", "--id", "gpu0", "--managed");
  expect(code).toBe(1);
  expect(stderr).toMatch(/^error: FAILED_PRECONDITION BINDING_DISABLED: managed attach of host PCI device 0000:01:00.0 asked for/);
  expect(ch.requests.length).toBe(before);
});

test("bad usage exits 2", async () => {
  expect((await vfiodctl("attach", "vm")).code).toBe(2);
  expect((await vfiodctl("--timeout", "soon", "list", "vm")).code).toBe(2);
});

test.each([
  [["--tls-cert", "c.pem", "--tls-key", "k.pem"], "need --tls-ca"],
  [["--tls-key", "k.pem", "--tls-ca", "ca.pem"], "go together"],
  [["--tls-cert", "c.pem", "--tls-ca", "ca.pem"], "go together"],
])("TLS flags that would fall back to plaintext or cannot work, %j, are a usage error (exit 2), nothing sent", async (flags, message) => {
  const before = ch.requests.length;
  const { code, stderr } = await vfiodctl(...flags, "list", "vm");
  expect(code).toBe(2);
  expect(stderr).toContain(message);
  expect(ch.requests.length).toBe(before);
});

describe("vms", () => {
  test("a table, STATE last and in full; --json the list as ListVms gives it", async () => {
    const table = await vfiodctl("vms");
    expect(table).toMatchObject({ code: 0, stderr: "" });
    const [header, ...rows] = table.stdout.trimEnd().split("\n");
    expect(header).toMatch(/^ID\s+NAME\s+HYPERVISOR\s+SOURCE\s+STATE$/);
    expect(rows[0]).toMatch(/^vm\s+vm\s+cloud-hypervisor\s+inventory\s+Running$/);
    expect(rows[1]).toMatch(/^gone\s+gone\s+cloud-hypervisor\s+inventory\s+unreachable: /);
    const { vms } = await server.inventory.listVms({});
    expect(rows[1]!.slice(header!.indexOf("STATE"))).toBe(vms[1]!.state);
    expect(vms[1]!.state).toMatch(/api socket does not exist/);

    const json = await vfiodctl("--json", "vms");
    expect(json.code).toBe(0);
    expect(JSON.parse(json.stdout)).toEqual([
      { id: "vm", name: "vm", hypervisor: "cloud-hypervisor", state: "Running", source: "inventory" },
      { id: "gone", name: "gone", hypervisor: "cloud-hypervisor", state: vms[1]!.state, source: "inventory" },
    ]);
  });
});

describe("devices", () => {
  test("a table within 120 columns; under a device that is not ready, why, indented and broken after a command", async () => {
    const table = await vfiodctl("devices");
    expect(table).toMatchObject({ code: 0, stderr: "" });
    const lines = table.stdout.trimEnd().split("\n");
    expect(lines[0]).toMatch(/^BDF\s+VENDOR:DEVICE\s+CLASS\s+DRIVER\s+GROUP\s+READY\s+HELD BY\s+NUMA$/);
    expect(lines[1]).toMatch(/^0000:01:00\.0\s+10de:2204\s+030000\s+vfio-pci\s+1\s+yes\s+-\s+0$/);
    expect(lines[2]).toMatch(/^0000:01:00\.1\s+10de:1aef\s+040300\s+vfio-pci\s+1\s+yes\s+-\s+-$/);
    expect(lines[3]).toMatch(/^0000:02:00\.0\s+8086:10fb\s+020000\s+vfio-pci\s+2\s+yes\s+-\s+-$/);
    expect(lines[4]).toMatch(/^0000:02:00\.1\s+8086:10fb\s+020000\s+-\s+2\s+no\s+-\s+-$/);
    const why = lines.slice(5);
    const { devices } = await server.inventory.listHostDevices({});
    const reason = devices.find((d) => d.bdf === "0000:02:00.1")!.notReadyReason;
    expect(reason).toMatch(/^host PCI device 0000:02:00\.1 is bound to no driver, not vfio-pci; bind it with: /);
    expect(why.length).toBeGreaterThan(1);
    for (const line of why) expect(line).toMatch(/^ {4}\S/);
    expect(why.map((line) => line.trim()).join(" ")).toBe(reason);
    for (const line of why.slice(0, -1)) expect(line).toMatch(/;$/);
    for (const line of lines) expect(line.length).toBeLessThanOrEqual(120);
  });

  test("--vfio-only leaves out the devices on no VFIO driver; --json the list as ListHostDevices gives it, every field", async () => {
    const vfio = await vfiodctl("devices", "--vfio-only");
    expect(vfio.code).toBe(0);
    expect(vfio.stdout.trimEnd().split("\n").slice(1).map((line) => line.split(/\s+/)[0])).toEqual([
      "0000:01:00.0",
      "0000:01:00.1",
      "0000:02:00.0",
    ]);
    const json = await vfiodctl("--json", "devices");
    expect(json.code).toBe(0);
    const listed = JSON.parse(json.stdout) as Record<string, unknown>[];
    expect(listed.map((d) => d.bdf)).toEqual(["0000:01:00.0", "0000:01:00.1", "0000:02:00.0", "0000:02:00.1"]);
    expect(listed[0]).toEqual({
      bdf: "0000:01:00.0",
      vendorId: "10de",
      deviceId: "2204",
      classCode: "030000",
      driver: "vfio-pci",
      iommuGroup: 1,
      groupMembers: ["0000:01:00.1"],
      ready: true,
      notReadyReason: "",
      heldByVm: "",
      heldByPid: 0,
      numaNode: 0,
    });
    expect(listed[3]).toMatchObject({ driver: "", ready: false, numaNode: -1 });
    expect(JSON.parse((await vfiodctl("--json", "devices", "--vfio-only")).stdout)).toHaveLength(3);
  });
});

describe("health", () => {
  test("SERVING for vfiod and for a service: exit 0; --json", async () => {
    expect(await vfiodctl("health")).toEqual({ code: 0, stdout: "SERVING\n", stderr: "" });
    expect(await vfiodctl("health", "vfiod.v1.DeviceService")).toEqual({ code: 0, stdout: "SERVING\n", stderr: "" });
    const json = await vfiodctl("--json", "health", "vfiod.v1.InventoryService");
    expect(json.code).toBe(0);
    expect(JSON.parse(json.stdout)).toEqual({ service: "vfiod.v1.InventoryService", status: "SERVING" });
  });

  test("NOT_SERVING (a draining vfiod) is printed and exits 1", async () => {
    server.vfiod.server.markNotServing();
    try {
      expect(await vfiodctl("health")).toEqual({ code: 1, stdout: "NOT_SERVING\n", stderr: "" });
      const json = await vfiodctl("--json", "health", "vfiod.v1.DeviceService");
      expect(json.code).toBe(1);
      expect(JSON.parse(json.stdout)).toEqual({ service: "vfiod.v1.DeviceService", status: "NOT_SERVING" });
    } finally {
      server.vfiod.server.markServing();
    }
  });

  test("an unknown service is the NOT_FOUND Health answers, exit 1", async () => {
    const plain = await vfiodctl("health", "no.such.Service");
    expect(plain).toMatchObject({ code: 1, stdout: "" });
    expect(plain.stderr).toMatch(/^error: NOT_FOUND: .*no\.such\.Service/);
    const json = await vfiodctl("--json", "health", "no.such.Service");
    expect(json.code).toBe(1);
    expect(JSON.parse(json.stdout)).toEqual({ error: { code: "NOT_FOUND", reason: "", message: expect.stringContaining("no.such.Service") } });
  });
});

test.each([["vms"], ["devices"], ["health"]])("%s where no vfiod serves: UNAVAILABLE, exit 1", async (command) => {
  const { code, stdout, stderr } = await vfiodctl(...NOWHERE, "--timeout", "2s", command);
  expect({ code, stdout }).toEqual({ code: 1, stdout: "" });
  expect(stderr).toMatch(/^error: UNAVAILABLE: .*\/nonexistent\/vfiod\.sock/);
});

describe("whole group", () => {
  test("attach --whole-group prints the device, then its companion; devices shows both held; detach --whole-group removes both", async () => {
    const attached = await vfiodctl("attach", "vm", "01:00.0", "--id", "gpu0", "--whole-group");
    expect(attached).toMatchObject({ code: 0, stderr: "" });
    const [header, ...rows] = attached.stdout.trimEnd().split("\n");
    expect(header).toMatch(/^ID\s+HOST BDF\s+GUEST BDF$/);
    expect(rows).toEqual([
      expect.stringMatching(/^gpu0\s+0000:01:00\.0\s+0000:00:\w\w\.\d$/),
      expect.stringMatching(/^gpu0-01-00-1\s+0000:01:00\.1\s+0000:00:\w\w\.\d$/),
    ]);
    const held = (await vfiodctl("devices", "--vfio-only")).stdout.split("\n");
    expect(held).toContainEqual(expect.stringMatching(/^0000:01:00\.0\s.*\sno\s+vm\s+0$/));
    expect(held).toContainEqual(expect.stringMatching(/^0000:01:00\.1\s.*\sno\s+vm\s+-$/));
    expect(held).toContainEqual("    attached to VM vm (device id gpu0-01-00-1, as vfiod last read it)");

    const detached = await vfiodctl("detach", "vm", "gpu0", "--whole-group");
    expect(detached).toEqual({ code: 0, stdout: "detached gpu0 and its companions from vm\n", stderr: "" });
    expect((await vfiodctl("list", "vm")).stdout).toBe("no VFIO devices attached\n");
  });

  test("--json attach --whole-group is one array, the device first (a plain attach's shape); --json detach", async () => {
    const attached = await vfiodctl("--json", "attach", "vm", "0000:01:00.0", "--id", "gpu1", "--whole-group");
    expect(attached.code).toBe(0);
    expect(JSON.parse(attached.stdout)).toEqual([
      expect.objectContaining({ id: "gpu1", bdf: "0000:01:00.0", path: "/sys/bus/pci/devices/0000:01:00.0" }),
      expect.objectContaining({ id: "gpu1-01-00-1", bdf: "0000:01:00.1", path: "/sys/bus/pci/devices/0000:01:00.1" }),
    ]);
    const detached = await vfiodctl("--json", "detach", "vm", "gpu1", "--whole-group");
    expect(detached.code).toBe(0);
    expect(JSON.parse(detached.stdout)).toEqual({ vm: "vm", id: "gpu1", detached: true, wholeGroup: true });
    expect(JSON.parse((await vfiodctl("--json", "list", "vm")).stdout)).toEqual([]);
  });

  test("a companion on no driver: attach --whole-group is FAILED_PRECONDITION DEVICE_NOT_VFIO, exit 1, nothing sent", async () => {
    const before = addDeviceRequests();
    const plain = await vfiodctl("attach", "vm", "02:00.0", "--id", "nic0", "--whole-group");
    expect(plain).toMatchObject({ code: 1, stdout: "" });
    expect(plain.stderr).toMatch(/^error: FAILED_PRECONDITION DEVICE_NOT_VFIO: host PCI device 0000:02:00\.1 is bound to no driver/);
    const json = await vfiodctl("--json", "attach", "vm", "02:00.0", "--whole-group");
    expect(json.code).toBe(1);
    expect(JSON.parse(json.stdout)).toEqual({ error: expect.objectContaining({ code: "FAILED_PRECONDITION", reason: "DEVICE_NOT_VFIO" }) });
    expect(addDeviceRequests()).toBe(before);
  });

  test("detach --whole-group of an id not attached: NOT_FOUND DEVICE_NOT_ATTACHED, exit 1", async () => {
    const { code, stderr } = await vfiodctl("detach", "vm", "gpu9", "--whole-group");
    expect(code).toBe(1);
    expect(stderr).toMatch(/^error: NOT_FOUND DEVICE_NOT_ATTACHED: /);
  });
});

test.each([
  [["vms", "--all"]],
  [["vms", "extra"]],
  [["devices", "--vfio"]],
  [["health", "a", "b"]],
  [["health", "--service", "x"]],
  [["attach", "vm", "01:00.0", "--whole-group=yes"]],
  [["detach", "vm", "gpu0", "--group"]],
  [["detach", "vm"]],
])("bad usage of a command, %j, exits 2 and sends nothing", async (args) => {
  const before = ch.requests.length;
  const { code, stdout, stderr } = await vfiodctl(...args);
  expect({ code, stdout }).toEqual({ code: 2, stdout: "" });
  expect(stderr).toMatch(/^error: /);
  expect(ch.requests.length).toBe(before);
});

describe("watch", () => {
  test("prints PRESENT, SYNCED, then each change as a line as it comes; an interrupt ends it with exit 0", async () => {
    await server.client.attach({ vm: "vm", pci: "01:00.0", id: "gpu0" });
    const child = spawn(process.execPath, [CLI_JS, "--address", server.address, "watch", "vm"], { stdio: ["ignore", "pipe", "pipe"] });
    const lines: string[] = [];
    readline.createInterface({ input: child.stdout }).on("line", (line) => lines.push(line));
    const exited = new Promise<number | null>((resolve) => child.once("exit", (code) => resolve(code)));
    try {
      await waitFor(() => lines.some((line) => line.includes(" SYNCED")), "SYNCED");
      await server.client.detach({ vm: "vm", id: "gpu0" });
      await waitFor(() => lines.some((line) => line.includes(" DETACHED ")), "DETACHED");
      const kinds = lines.map((line) => line.split(" ")[1]);
      expect(kinds).toEqual(["PRESENT", "SYNCED", "DETACH_REQUESTED", "DETACHED"]);
      expect(lines[0]).toMatch(/^\d{4}-\d\d-\d\dT\S+Z PRESENT vm gpu0 0000:01:00\.0 \(read now\)$/);
      expect(lines[3]).toContain("DETACHED vm gpu0 0000:01:00.0 (by vfiod)");
      child.kill("SIGINT");
      expect(await exited).toBe(0);
    } finally {
      child.kill("SIGKILL");
    }
  });

  test("--json prints each event's proto3 JSON; an unknown VM is refused with exit 1", async () => {
    const json = spawn(process.execPath, [CLI_JS, "--address", server.address, "--json", "watch", "vm"], { stdio: ["ignore", "pipe", "pipe"] });
    const lines: string[] = [];
    readline.createInterface({ input: json.stdout }).on("line", (line) => lines.push(line));
    try {
      await waitFor(() => lines.length > 0, "SYNCED");
      expect(JSON.parse(lines[0]!)).toMatchObject({ kind: "KIND_SYNCED" });
    } finally {
      json.kill("SIGINT");
    }
    const refused = await vfiodctl("watch", "nope");
    expect(refused.code).toBe(1);
    expect(refused.stderr).toContain("NOT_FOUND VM_NOT_FOUND");
  });
});
