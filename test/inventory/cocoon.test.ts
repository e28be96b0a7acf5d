import { execFileSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import {
  checkCocoonVm,
  COCOON_BACKENDS,
  cocoonIndexPath,
  cocoonMetaDbPath,
  parseCocoonIndex,
  type CocoonBackend,
  type CocoonVm,
} from "../../src/inventory/cocoon";
import { KERNEL_READ_WAIT_MS } from "../../src/host/kernel-reads";

const GPU_ID = "K7Q2MZ4XW3ABCDEFGHJ2345677";
const IDLE_ID = "K7QAAAAAAAAAAAAAAAAAAAAAAA";

function backend(dir: string): CocoonBackend {
  const found = COCOON_BACKENDS.find((b) => b.dir === dir);
  if (found === undefined) throw new Error(`no backend ${dir}`);
  return found;
}
const CH = backend("cloudhypervisor");
const FC = backend("firecracker");

// cocoon.md A.5's fixture shape, with run dirs under `root`.
function fixtureIndex(root: string): object {
  return {
    vms: {
      [GPU_ID]: {
        id: GPU_ID,
        state: "running",
        config: { name: "gpu-vm", cpu: 2, memory: 1073741824, storage: 10737418240, image: "ghcr.io/cocoonstack/cocoon/ubuntu:24.04", image_type: "oci" },
        pid: 0,
        network_configs: [],
        storage_configs: [],
        first_booted: true,
        created_at: "2026-05-13T10:00:00Z",
        updated_at: "2026-05-13T10:00:05Z",
        started_at: "2026-05-13T10:00:05Z",
        run_dir: path.join(root, "run", "cloudhypervisor", GPU_ID),
        log_dir: path.join(root, "log", "cloudhypervisor", GPU_ID),
      },
      [IDLE_ID]: {
        id: IDLE_ID,
        state: "stopped",
        config: { name: "idle-vm", cpu: 1, memory: 536870912, storage: 10737418240 },
        pid: 0,
        first_booted: false,
        created_at: "2026-05-13T09:00:00Z",
        updated_at: "2026-05-13T09:30:00Z",
        run_dir: path.join(root, "run", "cloudhypervisor", IDLE_ID),
      },
    },
    names: { "gpu-vm": GPU_ID, "idle-vm": IDLE_ID },
  };
}

function only(vms: CocoonVm[]): CocoonVm {
  const [vm, ...rest] = vms;
  if (vm === undefined || rest.length > 0) throw new Error(`expected one VM, got ${vms.length}`);
  return vm;
}

describe("parseCocoonIndex", () => {
  const root = "/var/lib/cocoon";

  test("reads cocoon's fixture: id, name, socket and ops lock under the record's run_dir", () => {
    const vms = parseCocoonIndex(JSON.stringify(fixtureIndex(root)), root, CH);
    const runDir = `/var/lib/cocoon/run/cloudhypervisor/${GPU_ID}`;
    expect(vms.map((vm) => vm.record)).toEqual([
      {
        id: GPU_ID,
        name: "gpu-vm",
        hypervisor: "cloud-hypervisor",
        socket: `${runDir}/api.sock`,
        source: "cocoon",
        opsLockPath: `${runDir}/ops.lock`,
      },
      expect.objectContaining({ id: IDLE_ID, name: "idle-vm", socket: `/var/lib/cocoon/run/cloudhypervisor/${IDLE_ID}/api.sock` }),
    ]);
    expect(vms[0]).toMatchObject({ state: "running", pidFile: `${runDir}/ch.pid`, binary: "cloud-hypervisor" });
    expect(vms[1]).toMatchObject({ state: "stopped" });
  });

  test("without run_dir, the run dir is <root>/run/<backend>/<id>; firecracker uses fc.pid", () => {
    const text = JSON.stringify({ vms: { ABC: { state: "running", config: { name: "fc-vm" } } } });
    const vm = only(parseCocoonIndex(text, "/srv/cocoon", FC));
    expect(vm.record).toEqual({
      id: "ABC",
      name: "fc-vm",
      hypervisor: "firecracker",
      socket: "/srv/cocoon/run/firecracker/ABC/api.sock",
      source: "cocoon",
      opsLockPath: "/srv/cocoon/run/firecracker/ABC/ops.lock",
    });
    expect(vm).toMatchObject({ pidFile: "/srv/cocoon/run/firecracker/ABC/fc.pid", binary: "firecracker" });
  });

  test("ignores unknown and unused keys, including a stored socket_path or hypervisor", () => {
    const text = JSON.stringify({
      vms: { ABC: { id: "ABC", state: "running", config: { name: "n", pci: [] }, socket_path: "/elsewhere.sock", hypervisor: "qemu", quarantine: true } },
      names: { n: "ABC" },
      orphan_dirs: ["/x"],
      tombstones: { OLD: {} },
    });
    const vm = only(parseCocoonIndex(text, root, CH));
    expect(vm.record.socket).toBe("/var/lib/cocoon/run/cloudhypervisor/ABC/api.sock");
    expect(vm.record.hypervisor).toBe("cloud-hypervisor");
  });

  test("a record without a name is named by its id; an index without vms holds none", () => {
    expect(only(parseCocoonIndex('{"vms":{"ABC":{"state":"created"}}}', root, CH)).record.name).toBe("ABC");
    expect(only(parseCocoonIndex('{"vms":{"ABC":{"config":{"name":null}}}}', root, CH)).record.name).toBe("ABC");
    expect(parseCocoonIndex('{"names":{}}', root, CH)).toEqual([]);
    expect(parseCocoonIndex('{"vms":{}}', root, CH)).toEqual([]);
  });

  test.each<[string, string, RegExp]>([
    ["not JSON", '{"vms":', /^not JSON: /],
    ["a top-level array", "[]", /^must be an object$/],
    ["vms as an array", '{"vms":[]}', /^vms: must be an object keyed by VM id$/],
    ["a record that is not an object", '{"vms":{"ABC":1}}', /^vms\["ABC"\]: must be an object$/],
    ["a state of the wrong type", '{"vms":{"ABC":{"state":1}}}', /^vms\["ABC"\]\.state: must be a string$/],
    ["a config of the wrong type", '{"vms":{"ABC":{"config":"x"}}}', /^vms\["ABC"\]\.config: must be an object$/],
    ["a name of the wrong type", '{"vms":{"ABC":{"config":{"name":5}}}}', /^vms\["ABC"\]\.config\.name: must be a string$/],
    ["an id that differs from its key", '{"vms":{"ABC":{"id":"XYZ"}}}', /^vms\["ABC"\]\.id: "XYZ" differs from its key$/],
    ["a relative run_dir", '{"vms":{"ABC":{"run_dir":"run/ABC"}}}', /^vms\["ABC"\]\.run_dir: must be an absolute path$/],
  ])("refuses %s, saying where", (_what, text, message) => {
    expect(() => parseCocoonIndex(text, root, CH)).toThrow(message);
  });

  test("paths: index per backend dir, sqlite store under meta/", () => {
    expect(cocoonIndexPath("/r", CH)).toBe("/r/cloudhypervisor/db/vms.json");
    expect(cocoonIndexPath("/r", FC)).toBe("/r/firecracker/db/vms.json");
    expect(cocoonMetaDbPath("/r")).toBe("/r/meta/meta.db");
  });
});

describe("checkCocoonVm", () => {
  let tmp: string;
  let procRoot: string;

  beforeEach(() => {
    tmp = fs.mkdtempSync(path.join(os.tmpdir(), "vfiod-"));
    procRoot = path.join(tmp, "proc");
    fs.mkdirSync(procRoot);
  });
  afterEach(() => fs.rmSync(tmp, { recursive: true, force: true }));

  /** A cocoon VM in `state` with its run dir made and, when given, its pid file written. */
  function cocoonVm(state: string, pidFile?: string, which: CocoonBackend = CH): CocoonVm {
    const text = JSON.stringify({ vms: { [GPU_ID]: { id: GPU_ID, state, config: { name: "gpu-vm" } } } });
    const vm = only(parseCocoonIndex(text, tmp, which));
    fs.mkdirSync(path.dirname(vm.pidFile), { recursive: true });
    if (pidFile !== undefined) fs.writeFileSync(vm.pidFile, pidFile);
    return vm;
  }

  /** A fake /proc/<pid> entry: an exe symlink and a NUL-separated cmdline. */
  function fakeProcess(pid: number, exe: string, args?: string[]): void {
    const dir = path.join(procRoot, String(pid));
    fs.mkdirSync(dir);
    fs.symlinkSync(exe, path.join(dir, "exe"));
    if (args !== undefined) fs.writeFileSync(path.join(dir, "cmdline"), [exe, ...args].map((a) => `${a}\0`).join(""));
  }

  async function notRunning(vm: CocoonVm): Promise<string | undefined> {
    return (await checkCocoonVm(vm, procRoot)).notRunning;
  }

  test("a running cloud-hypervisor serving the VM's socket is reachable", async () => {
    const vm = cocoonVm("running", "4242\n");
    fakeProcess(4242, "/usr/local/bin/cloud-hypervisor", ["--api-socket", `path=${vm.record.socket}`, "--cpus", "boot=2"]);
    const checked = await checkCocoonVm(vm, procRoot);
    expect(checked).toEqual(vm.record);
    expect(checked).not.toHaveProperty("notRunning");
  });

  test("a running firecracker with --api-sock is reachable", async () => {
    const vm = cocoonVm("running", "77\n", FC);
    fakeProcess(77, "/usr/bin/firecracker", ["--api-sock", vm.record.socket, "--id", GPU_ID]);
    expect(await notRunning(vm)).toBeUndefined();
  });

  test("a hypervisor binary replaced while running (exe ... (deleted)) still counts", async () => {
    const vm = cocoonVm("running", "4242");
    fakeProcess(4242, "/usr/bin/cloud-hypervisor (deleted)", [`--api-socket=${vm.record.socket}`]);
    expect(await notRunning(vm)).toBeUndefined();
  });

  test.each(["stopped", "created", "error"])("state %s is not running, without looking at the process", async (state) => {
    const vm = cocoonVm(state, "4242\n");
    fakeProcess(4242, "/usr/bin/cloud-hypervisor", ["--api-socket", `path=${vm.record.socket}`]);
    expect(await notRunning(vm)).toBe(`state is ${state}`);
  });

  test("no recorded state is not running", async () => {
    const vm = only(parseCocoonIndex('{"vms":{"ABC":{}}}', tmp, CH));
    expect(await notRunning(vm)).toBe("state is unset");
  });

  test("a missing pid file", async () => {
    expect(await notRunning(cocoonVm("running"))).toBe("pid file missing");
  });

  test.each(["", "abc\n", "0\n", "-5\n", "12 34\n", "4242x"])("a pid file holding %j is invalid", async (text) => {
    expect(await notRunning(cocoonVm("running", text))).toBe("pid file invalid");
  });

  test("an unreadable pid file (a directory) says so", async () => {
    const vm = cocoonVm("running");
    fs.mkdirSync(vm.pidFile);
    expect(await notRunning(vm)).toBe("pid file unreadable (EISDIR)");
  });

  test("a pid with no process is not running", async () => {
    expect(await notRunning(cocoonVm("running", "4242\n"))).toBe("process 4242 is not running");
  });

  test("a pid reused by another program", async () => {
    const vm = cocoonVm("running", "4242\n");
    fakeProcess(4242, "/usr/bin/sleep", [vm.record.socket]);
    expect(await notRunning(vm)).toBe("process 4242 is not cloud-hypervisor");
  });

  test("a firecracker VM whose pid is a cloud-hypervisor", async () => {
    const vm = cocoonVm("running", "4242\n", FC);
    fakeProcess(4242, "/usr/bin/cloud-hypervisor", ["--api-socket", vm.record.socket]);
    expect(await notRunning(vm)).toBe("process 4242 is not firecracker");
  });

  test("a process that exits between the exe and cmdline reads is not running", async () => {
    const vm = cocoonVm("running", "4242\n");
    fakeProcess(4242, "/usr/bin/cloud-hypervisor");
    expect(await notRunning(vm)).toBe("process 4242 is not running");
  });

  test("a cloud-hypervisor stuck in the kernel (its cmdline does not come) is taken as the VM's, within the bound", async () => {
    const vm = cocoonVm("running", "4242\n");
    fakeProcess(4242, "/usr/bin/cloud-hypervisor");
    const cmdline = path.join(procRoot, "4242", "cmdline");
    execFileSync("mkfifo", [cmdline]);
    try {
      const started = performance.now();
      expect(await notRunning(vm)).toBeUndefined();
      expect(performance.now() - started).toBeLessThan(KERNEL_READ_WAIT_MS + 2000);
    } finally {
      // A writer ends the read still blocked on the FIFO.
      fs.closeSync(fs.openSync(cmdline, fs.constants.O_WRONLY | fs.constants.O_NONBLOCK));
    }
  });

  test("a cloud-hypervisor serving another VM's socket", async () => {
    const vm = cocoonVm("running", "4242\n");
    fakeProcess(4242, "/usr/bin/cloud-hypervisor", ["--api-socket", "path=/var/lib/cocoon/run/cloudhypervisor/OTHER/api.sock"]);
    expect(await notRunning(vm)).toBe(`process 4242 is not serving ${vm.record.socket}`);
  });

  test.each([
    ["inside a longer path", (socket: string) => `path=/chroot${socket}`],
    ["with a suffix", (socket: string) => `${socket}.old`],
  ])("the socket path %s does not count", async (_what, arg) => {
    const vm = cocoonVm("running", "4242\n");
    fakeProcess(4242, "/usr/bin/cloud-hypervisor", ["--api-socket", arg(vm.record.socket)]);
    expect(await notRunning(vm)).toBe(`process 4242 is not serving ${vm.record.socket}`);
  });
});
