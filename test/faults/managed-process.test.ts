// The real vfiod process (dist/src/main.js) with --manage-binding: refused at start
// without --allow-devices; killed with SIGKILL
// in the middle of a managed Attach: after its state write and its bind (the
// device is on vfio-pci), before the attach completed (the Cloud Hypervisor
// double's add-device hangs). Started again on the same --state-dir, it puts the
// device back on its driver before it serves, and says so; a device a process
// still holds is kept for its Detach. The kernel's part on the fake tree is
// played in this process (FakeKernel.follow), acting on the writes the vfiod
// process makes to the tree's files.
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { createDeviceClient } from "../../src/grpc/client";
import { ChDouble } from "../support/ch-double";
import { addInterface } from "../support/fake-host";
import { FakeKernel } from "../support/fake-kernel";
import { buildFakeSysfs, type FakeFunction, type FakeSysfs } from "../support/fake-sysfs";
import { runVfiodToExit, startVfiod, type VfiodProcess } from "../support/vfiod-process";
import { VmmProcess } from "../support/vmm-process";
import { waitFor } from "../support/wait";

const NIC = "0000:02:00.0";
const FUNCTIONS: FakeFunction[] = [{ bdf: NIC, driver: "e1000e", group: 20, vendor: "0x8086", device: "0x10d3", pciClass: "0x020000" }];

let dir: string;
let stateDir: string;
let sysfs: FakeSysfs;
let kernel: FakeKernel;
let unfollow: () => void;
let ch: ChDouble;
const processes: VfiodProcess[] = [];
const holders: VmmProcess[] = [];

const args = () => [
  ...["--inventory", path.join(dir, "inventory.json"), "--sysfs-root", sysfs.root, "--cocoon-root", path.join(dir, "no-cocoon")],
  ...["--manage-binding", "--allow-devices", NIC, "--state-dir", stateDir, "--hypervisor-timeout", "60s"],
];
const stateFiles = () => (fs.existsSync(stateDir) ? fs.readdirSync(stateDir) : []);

async function start(): Promise<VfiodProcess> {
  const vfiod = await startVfiod(args());
  processes.push(vfiod);
  return vfiod;
}

/** Starts a managed Attach that hangs in add-device, and kills vfiod once the device is bound and the add is in flight. */
async function killMidAttach(): Promise<void> {
  ch.inject("vm.add-device", { kind: "hang" });
  const first = await start();
  const client = createDeviceClient(first.address);
  const call = client.attach({ vm: "vm", pci: NIC, id: "nic0", managed: true }, { timeoutMs: 30_000 }).catch((err: unknown) => err);
  await waitFor(() => ch.requests.some((r) => r.endpoint === "vm.add-device"), "the add-device request in flight", 20_000);
  // The window: recorded, bound to vfio-pci, not attached.
  expect(kernel.driverOf(NIC)).toBe("vfio-pci");
  expect(fs.existsSync(path.join(sysfs.root, "dev/vfio/20"))).toBe(true);
  expect(JSON.parse(fs.readFileSync(path.join(stateDir, `${NIC}.json`), "utf8"))).toMatchObject({ driver: "e1000e", phase: "binding" });
  first.child.kill("SIGKILL");
  expect(await first.exited).toBe("SIGKILL");
  await call;
  client.close();
}

beforeEach(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "vfiod-crash-"));
  stateDir = path.join(dir, "state");
  sysfs = buildFakeSysfs(FUNCTIONS, { groupNodes: "vfio-bound" });
  addInterface(sysfs, NIC, "enp2s0", false);
  kernel = new FakeKernel(sysfs, FUNCTIONS);
  unfollow = kernel.follow();
  ch = await ChDouble.start(path.join(dir, "ch.sock"), { sysfsRoot: sysfs.root });
  ch.setState("Running");
  fs.writeFileSync(path.join(dir, "inventory.json"), JSON.stringify({ vms: [{ name: "vm", hypervisor: "cloud-hypervisor", socket: ch.socketPath }] }));
});

afterEach(async () => {
  for (const p of processes.splice(0)) if (p.child.exitCode === null && p.child.signalCode === null) p.child.kill("SIGKILL");
  for (const h of holders.splice(0)) h.stop();
  unfollow();
  await ch.close();
  sysfs.cleanup();
  fs.rmSync(dir, { recursive: true, force: true });
});

test("killed between the bind and the attach, vfiod started again puts the device back on e1000e before serving, and logs it", async () => {
  await killMidAttach();
  const second = await start();
  // Repaired before "vfiod serving": no wait needed.
  expect(kernel.driverOf(NIC)).toBe("e1000e");
  expect(kernel.override(NIC)).toBeUndefined();
  expect(fs.existsSync(path.join(sysfs.deviceDir(NIC), "net/enp2s0"))).toBe(true);
  expect(fs.existsSync(path.join(sysfs.root, "dev/vfio/20"))).toBe(false);
  expect(stateFiles()).toEqual([]);
  const restored = second.logs.find((line) => line.msg === "managed binding: driver restored");
  expect(restored).toMatchObject({ device: NIC, from: "vfio-pci", to: "e1000e", had: "e1000e" });
  const repair = second.logs.find((line) => typeof line.msg === "string" && line.msg.startsWith("managed binding: repair"));
  expect(repair).toMatchObject({ device: NIC, phase: "binding", vm: "vm", msg: "managed binding: repair: attach never completed; driver restored" });
  expect(second.logs.findIndex((line) => line === repair)).toBeLessThan(second.logs.findIndex((line) => line.msg === "vfiod serving"));
  await second.stop();
});

test("killed the same way while a process holds the device's group open: started again, vfiod keeps it on vfio-pci and its record", async () => {
  await killMidAttach();
  // A VMM that opened the group node (as CH would once add-device got that far).
  const holder = VmmProcess.spawn("cloud-hypervisor", ["--api-socket", `path=${ch.socketPath}`]);
  holders.push(holder);
  holder.open(path.join(sysfs.root, "dev/vfio/20"));
  await holder.settled();
  const second = await start();
  expect(kernel.driverOf(NIC)).toBe("vfio-pci");
  expect(stateFiles()).toEqual([`${NIC}.json`]);
  const kept = second.logs.find((line) => line.msg === "managed binding: repair: device held by a process; kept for its Detach");
  expect(kept).toMatchObject({ device: NIC });
  expect(String(kept?.heldBy)).toMatch(/^process \d+ \(bash\)$/);
  await second.stop();
});

test("without --manage-binding, a vfiod that finds records in --state-dir says so and changes nothing", async () => {
  await killMidAttach();
  const plain = await startVfiod([
    ...["--inventory", path.join(dir, "inventory.json"), "--sysfs-root", sysfs.root, "--cocoon-root", path.join(dir, "no-cocoon")],
    ...["--state-dir", stateDir],
  ]);
  processes.push(plain);
  expect(kernel.driverOf(NIC)).toBe("vfio-pci");
  expect(stateFiles()).toEqual([`${NIC}.json`]);
  const warning = plain.logs.find((line) => typeof line.msg === "string" && line.msg.includes("without it, their drivers are not restored"));
  expect(warning).toMatchObject({ devices: [`${NIC} (had e1000e, for VM vm)`] });
  await plain.stop();
});

test.each([
  [["--manage-binding"], {}],
  [["--manage-binding", "--allow-devices", "*:*"], {}],
  [[], { VFIOD_MANAGE_BINDING: "1" }],
])("vfiod %j %j refuses to start (exit 2 with usage): it must never take the host's own disks or NICs", async (argv, env) => {
  const run = await runVfiodToExit(["--listen", "127.0.0.1:0", ...argv], env);
  expect(run.exit).toBe(2);
  expect(run.stderr).toContain("--manage-binding needs");
  expect(run.stderr).toContain("Usage: vfiod");
  expect(run.stderr).toContain("--state-dir <dir>");
});
