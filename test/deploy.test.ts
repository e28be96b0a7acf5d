// deploy/: the systemd unit, its example environment file, its managed-binding drop-in, the
// container recipe and the Kubernetes DaemonSet agree with vfiod's flags and with each other;
// the drop-in opens every sysfs file managed binding writes; the DaemonSet's health probe works
// against a real vfiod. (.ci/run runs systemd-analyze verify on the unit;
// no container engine runs here, so the Containerfile is checked as text only.)
import { spawnSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import yaml from "js-yaml";
import { parseConfig, parseDuration, UsageError, type Config } from "../src/config";
import { DeviceAllowList } from "../src/host/device-allow-list";
import { ChDouble } from "./support/ch-double";
import { FakeKernel, RecordingWriter } from "./support/fake-kernel";
import { buildFakeSysfs } from "./support/fake-sysfs";
import { startTestServer } from "./support/test-server";
import { INSTALL_PARTS, startVfiod, type VfiodProcess } from "./support/vfiod-process";
import { waitFor } from "./support/wait";

const DEPLOY = path.resolve(__dirname, "../deploy");
const CHECKOUT = path.resolve(__dirname, "..");
/** Where the unit, the image and the probe expect the built server. */
const INSTALL_DIR = "/usr/lib/vfiod";
const read = (file: string) => fs.readFileSync(path.join(DEPLOY, file), "utf8");

/** A unit file's [Service] settings: key -> every value, in order. */
function unitSettings(text: string): Map<string, string[]> {
  const settings = new Map<string, string[]>();
  let section = "";
  for (const line of text.split("\n")) {
    if (/^\s*(#|;|$)/.test(line)) continue;
    const header = /^\[(.+)\]$/.exec(line.trim());
    if (header !== null) {
      section = header[1]!;
      continue;
    }
    const at = line.indexOf("=");
    if (section !== "Service" || at < 0) continue;
    const key = line.slice(0, at).trim();
    settings.set(key, [...(settings.get(key) ?? []), line.slice(at + 1).trim()]);
  }
  return settings;
}

const unit = unitSettings(read("vfiod.service"));
const setting = (key: string) => unit.get(key) ?? [];
/** The unit's Environment= assignments, every one. */
const unitAssignments: Record<string, string> = Object.fromEntries(setting("Environment").map((assignment) => assignment.split(/=(.*)/s).slice(0, 2)));
/** Those that are vfiod's settings. */
const unitEnv: Record<string, string> = Object.fromEntries(Object.entries(unitAssignments).filter(([name]) => name.startsWith("VFIOD_")));

/** vfiod's usage text, which lists every flag. */
const USAGE = (() => {
  try {
    parseConfig(["--help"], {});
  } catch (err) {
    if (err instanceof UsageError) return err.usage;
  }
  throw new Error("--help did not give the usage");
})();

/**
 * `parseConfig` of VFIOD_* variables alone, as the process would see them; each must name a
 * flag (vfiod ignores a variable it does not know).
 */
function configOf(env: Record<string, string>): Config {
  for (const name of Object.keys(env)) {
    expect({ [name]: USAGE.includes(`--${name.replace(/^VFIOD_/, "").toLowerCase().replaceAll("_", "-")} `) }).toEqual({ [name]: true });
  }
  return parseConfig([], env);
}

describe("deploy/vfiod.service", () => {
  test("runs the built server from the install directory with node", () => {
    expect(setting("ExecStart")).toEqual([`/usr/bin/node ${INSTALL_DIR}/dist/src/main.js`]);
    expect(setting("Type")).toEqual(["simple"]);
  });

  test("its defaults are vfiod flags: the Unix socket alone, inside RuntimeDirectory=; the audit log inside LogsDirectory=", () => {
    const config = configOf(unitEnv);
    expect(config.listen).toBeUndefined();
    expect(config.socket).toBe("/run/vfiod/vfiod.sock");
    expect(config.socketMode).toBe(0o660);
    expect(config.socketGroup).toBe("vfiod");
    expect(path.dirname(config.socket!)).toBe(`/run/${setting("RuntimeDirectory").join(" ")}`);
    expect(path.dirname(config.auditLog!)).toBe(`/var/log/${setting("LogsDirectory").join(" ")}`);
    // the group the socket gets is the one the sysusers file creates
    expect(read("vfiod.sysusers")).toMatch(new RegExp(`^g ${config.socketGroup} -$`, "m"));
  });

  test("every setting deploy/vfiod.default shows is a vfiod flag with a valid value", () => {
    const env: Record<string, string> = { ...unitEnv };
    const shown = [...read("vfiod.default").matchAll(/^#(VFIOD_[A-Z_]+)=(.*)$/gm)];
    expect(shown.length).toBeGreaterThan(10);
    for (const [, name, value] of shown) env[name!] = value!; // later ones win, as in the file
    const config = configOf(env);
    // the file ends with the remote control plane's TCP listener with mTLS
    expect(config.listen).toBe("0.0.0.0:50051");
    expect(config.tlsClientCa).toBeDefined();
    expect(config.allowClients).toEqual(new Set(["control-plane"]));
  });

  test("runs node with two malloc arenas, as the container image does (and the bench)", () => {
    const others = Object.entries(unitAssignments).filter(([name]) => !name.startsWith("VFIOD_"));
    expect(others).toEqual([["MALLOC_ARENA_MAX", "2"]]);
    expect(read("Containerfile")).toMatch(/^ENV MALLOC_ARENA_MAX=2$/m);
    expect(fs.readFileSync(path.join(CHECKOUT, "bench/vfiod-process.ts"), "utf8")).toContain('MALLOC_ARENA_MAX: "2"');
  });

  test("leaves what vfiod needs: /proc of other processes visible, W^X off for V8's JIT, cocoon's run dirs writable", () => {
    expect(setting("ProtectProc")).toEqual([]);
    expect(setting("PrivateDevices")).toEqual([]);
    expect(setting("MemoryDenyWriteExecute")).toEqual([]);
    expect(setting("ProtectSystem")).toEqual(["strict"]);
    expect(setting("ReadWritePaths")).toEqual(["-/var/lib/cocoon/run"]);
  });
});

describe("deploy/vfiod.service.d/managed-binding.conf", () => {
  const dropIn = unitSettings(read("vfiod.service.d/managed-binding.conf"));
  const dropInEnv = Object.fromEntries((dropIn.get("Environment") ?? []).map((assignment) => assignment.split(/=(.*)/s).slice(0, 2)));
  const writable = (dropIn.get("ReadWritePaths") ?? []).join(" ").split(/\s+/);

  test("turns managed binding on; with /etc/default/vfiod's allow-list vfiod takes it, and keeps --state-dir across a stop", () => {
    const [, allowList] = /^#VFIOD_ALLOW_DEVICES=(.*)$/m.exec(read("vfiod.default"))!;
    const config = configOf({ ...unitEnv, ...dropInEnv, VFIOD_ALLOW_DEVICES: allowList! });
    expect(config.manageBinding).toBe(true);
    expect(config.stateDir).toBe(`/run/${setting("RuntimeDirectory").join(" ")}`);
    expect(dropIn.get("RuntimeDirectoryPreserve")).toEqual(["yes"]);
    // Without an allow-list vfiod does not start: a usage error, which the unit does not restart.
    expect(() => configOf({ ...unitEnv, ...dropInEnv })).toThrow(UsageError);
    expect(setting("RestartPreventExitStatus")).toEqual(["2"]);
  });

  test("makes writable every sysfs file a managed Attach and Detach write, the kernel's links followed", async () => {
    const nic = "0000:02:00.0";
    const functions = [{ bdf: nic, driver: "e1000e", group: 20, vendor: "0x8086", device: "0x10d3", pciClass: "0x020000" }];
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), "vfiod-dropin-"));
    const sysfs = buildFakeSysfs(functions, { groupNodes: "vfio-bound" });
    const written: string[] = [];
    // Where each write lands once sysfs's symlinks are followed, taken before the kernel acts on it.
    const writer = new (class extends RecordingWriter {
      override async write(file: string, value: string): Promise<void> {
        written.push(fs.realpathSync(path.join(sysfs.root, file)).slice(sysfs.root.length));
        await super.write(file, value);
      }
    })(new FakeKernel(sysfs, functions));
    const ch = await ChDouble.start(path.join(dir, "ch.sock"), { sysfsRoot: sysfs.root, ejectAfterMs: 5 });
    ch.setState("Running");
    const inventoryFile = path.join(dir, "inventory.json");
    fs.writeFileSync(inventoryFile, JSON.stringify({ vms: [{ name: "vm", hypervisor: "cloud-hypervisor", socket: ch.socketPath }] }));
    const server = await startTestServer({
      inventoryFile,
      sysfsRoot: sysfs.root,
      detachTimeoutMs: 500,
      allowList: DeviceAllowList.parse(nic, sysfs.root),
      binding: { stateDir: path.join(dir, "state"), writer, pollMs: 50 },
    });
    try {
      await server.client.attach({ vm: "vm", pci: nic, id: "nic0", managed: true });
      await server.client.detach({ vm: "vm", id: "nic0" });
      await waitFor(() => written.length >= 6, "the driver is given back");
    } finally {
      await server.stop();
      await ch.close();
      sysfs.cleanup();
      fs.rmSync(dir, { recursive: true, force: true });
    }
    expect(written.length).toBe(6);
    expect(written.filter((file) => !writable.some((dir) => file.startsWith(`${dir}/`)))).toEqual([]);
    // driver_override is under /sys/devices, not /sys/bus/pci: both are needed.
    expect(writable.filter((dir) => !written.some((file) => file.startsWith(`${dir}/`)))).toEqual([]);
  });
});

describe("deploy/Containerfile", () => {
  const containerfile = read("Containerfile");

  test("ships the install the read-only test runs, and runs it from the install directory", () => {
    const copied = [...containerfile.matchAll(/^COPY --from=build \/src\/(\S+) /gm)].map((m) => m[1]);
    expect(copied.sort()).toEqual([...INSTALL_PARTS, "node_modules"].sort());
    expect(containerfile).toMatch(new RegExp(`^WORKDIR ${INSTALL_DIR}$`, "m"));
    expect(containerfile).toMatch(new RegExp(`^ENTRYPOINT \\["node", "${INSTALL_DIR}/dist/src/main.js"\\]$`, "m"));
  });

  test("builds with npm ci (its prepare script) and keeps only production dependencies", () => {
    expect(containerfile).toMatch(/^FROM node:20-bookworm AS build$/m);
    expect(containerfile).toMatch(/npm ci --no-audit --no-fund \\\n && npm prune --omit=dev/);
  });

  test("its ENV defaults are vfiod flags: the Unix socket alone, the host's sys/ under /host", () => {
    const env = Object.fromEntries([...containerfile.matchAll(/(VFIOD_[A-Z_]+)=(\S+)/g)].map((m) => [m[1]!, m[2]!]));
    const config = configOf(env);
    expect(config.listen).toBeUndefined();
    expect(config.socket).toBe("/run/vfiod/vfiod.sock");
    expect(config.sysfsRoot).toBe("/host");
  });
});

interface Container {
  env: { name: string; value: string }[];
  securityContext: Record<string, unknown> & { capabilities: { drop: string[]; add: string[] } };
  readinessProbe: { exec: { command: string[] }; timeoutSeconds: number };
  livenessProbe: { exec: { command: string[] }; timeoutSeconds: number };
  volumeMounts: { name: string; mountPath: string; readOnly?: boolean }[];
}

describe("deploy/kubernetes/daemonset.yaml", () => {
  const docs = yaml.loadAll(read("kubernetes/daemonset.yaml")) as { kind: string; metadata: { name: string; namespace?: string }; spec?: any }[];
  const daemonSet = docs.find((doc) => doc.kind === "DaemonSet")!;
  const pod = daemonSet.spec.template.spec;
  const container = pod.containers[0] as Container;
  const config = configOf(Object.fromEntries(container.env.map((e) => [e.name, e.value])));
  const mount = (at: string) => container.volumeMounts.find((m) => m.mountPath === at);

  test("a Namespace and a DaemonSet in it", () => {
    expect(docs.map((doc) => doc.kind)).toEqual(["Namespace", "DaemonSet"]);
    expect(daemonSet.metadata.namespace).toBe(docs[0]!.metadata.name);
    expect(daemonSet.metadata.namespace).toBe("vfiod-system");
  });

  test("hostPID, a read-only root, root with the unit's capabilities and no more", () => {
    expect(pod.hostPID).toBe(true);
    expect(container.securityContext.readOnlyRootFilesystem).toBe(true);
    expect(container.securityContext.privileged).toBe(false);
    expect(container.securityContext.capabilities.drop).toEqual(["ALL"]);
    const unitCapabilities = setting("CapabilityBoundingSet").join(" ").split(/\s+/).map((cap) => cap.replace(/^CAP_/, ""));
    expect([...container.securityContext.capabilities.add].sort()).toEqual(unitCapabilities.sort());
  });

  test("serves the Unix socket alone, on a host directory; reads the host's sys/ and dev/vfio read-only under --sysfs-root", () => {
    expect(config.listen).toBeUndefined();
    expect(mount(path.dirname(config.socket!))).toBeDefined();
    expect(mount(path.dirname(config.socket!))!.readOnly).toBeUndefined();
    for (const part of ["sys", "dev/vfio"]) expect(mount(path.join(config.sysfsRoot, part))).toMatchObject({ readOnly: true });
    expect(mount(config.cocoonRoot)!.readOnly).toBeUndefined(); // cocoon's ops.lock flock
    expect(mount(path.dirname(config.inventory!))).toBeDefined();
  });

  describe("the exec health probe", () => {
    let dir: string;
    let vfiod: VfiodProcess | undefined;
    beforeEach(() => {
      dir = fs.mkdtempSync(path.join(os.tmpdir(), "vfiod-probe-"));
    });
    afterEach(async () => {
      await vfiod?.stop();
      vfiod = undefined;
      fs.rmSync(dir, { recursive: true, force: true });
    });

    /** The probe's command, run here: this checkout for the install, `socket` for vfiod's. */
    function probe(socket: string) {
      const command = container.readinessProbe.exec.command.map((arg) =>
        arg.replaceAll(`${INSTALL_DIR}/`, `${CHECKOUT}/`).replaceAll(config.socket!, socket),
      );
      expect(command[0]).toBe("node");
      return spawnSync(process.execPath, command.slice(1), { encoding: "utf8", timeout: 15_000 });
    }

    test("liveness and readiness run the same check: vfiodctl health from the install, on the configured socket", () => {
      expect(container.livenessProbe.exec).toEqual(container.readinessProbe.exec);
      const command = container.readinessProbe.exec.command;
      expect(command).toEqual(["node", `${INSTALL_DIR}/dist/src/cli.js`, "--address", `unix:${config.socket}`, "--timeout", "2s", "health"]);
      // vfiodctl gives up, saying why, before kubelet kills the probe
      const timeout = parseDuration(command[command.indexOf("--timeout") + 1]!);
      for (const probe of [container.readinessProbe, container.livenessProbe]) expect(timeout).toBeLessThan(probe.timeoutSeconds * 1000);
    });

    test("passes on a serving vfiod, fails with the reason where none serves", async () => {
      const socket = path.join(dir, "vfiod.sock");
      vfiod = await startVfiod(["--socket", socket, "--cocoon-root", dir]);
      const passing = probe(socket);
      expect({ status: passing.status, stdout: passing.stdout, stderr: passing.stderr }).toEqual({
        status: 0,
        stdout: "SERVING\n",
        stderr: "",
      });
      await vfiod.stop();
      const failing = probe(socket);
      expect(failing.status).toBe(1);
      expect(failing.stderr).toMatch(/^error: UNAVAILABLE: /);
      expect(failing.stderr).toContain(`connect ENOENT ${socket}`);
    });
  });
});
