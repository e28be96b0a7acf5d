// vfiodctl, the real built binary, against a vfiod server and a Cloud Hypervisor double.
import { execFile } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { promisify } from "node:util";
import { ChDouble } from "./support/ch-double";
import { buildFakeSysfs, type FakeSysfs } from "./support/fake-sysfs";
import { startTestServer, type TestServer } from "./support/test-server";
import { CLI_JS } from "./support/vfiod-process";

let dir: string;
let sysfs: FakeSysfs;
let ch: ChDouble;
let server: TestServer;

beforeAll(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "vfiod-cli-"));
  sysfs = buildFakeSysfs([{ bdf: "0000:01:00.0", driver: "vfio-pci", group: 1 }]);
  ch = await ChDouble.start(path.join(dir, "ch.sock"), { ejectAfterMs: 10 });
  ch.setState("Running");
  const inventoryFile = path.join(dir, "inventory.json");
  fs.writeFileSync(inventoryFile, JSON.stringify({ vms: [{ name: "vm", hypervisor: "cloud-hypervisor", socket: path.join(dir, "ch.sock") }] }));
  server = await startTestServer({ inventoryFile, sysfsRoot: sysfs.root });
});

afterAll(async () => {
  await server.stop();
  await ch.close();
  sysfs.cleanup();
  fs.rmSync(dir, { recursive: true, force: true });
});

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
