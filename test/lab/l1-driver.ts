// The lab's driver, run inside L1 by l1-main.sh with lab.json. Starts vfiod as a
// real process serving both L2 QEMUs and drives it only through its gRPC API,
// with real vfio-pci devices. Prints each step with its timing ("LAB " lines
// reach the lab's output) and records them in <out>/result.json for lab.test.ts.
import * as grpc from "@grpc/grpc-js";
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import fs from "node:fs";
import net from "node:net";
import path from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { companionId } from "../../src/device-id";
import { createDeviceClient, errorReason, type DeviceClient } from "../../src/grpc/client";
import type {
  CallFailure,
  GuestLine,
  HostDriverState,
  LabConfig,
  LabDevice,
  LabPciDevice,
  LabResult,
  ManagedTimings,
  Step,
  StepName,
  StepValues,
} from "./result";

// Every wait is bounded; lab.sh bounds L1 as a whole.
/** vfiod took 35-72 s to listen (over 90 s on a loaded host): node under TCG, beside a booting L2. */
const READY_MS = 180_000;
const LIST_MS = 30_000;
/** device_add vfio-pci into a firmware-only L2 took 10-15 s in some runs. */
const ATTACH_MS = 90_000;
/** Above --detach-timeout, so a DEADLINE_EXCEEDED is vfiod's, not the client's. */
const DETACH_MS = 45_000;
/** The booting L2 reached its shell after 80-160 s here (TCG in TCG). */
const L2_BOOT_MS = 300_000;
const GUEST_MS = 60_000;
const STOP_MS = 15_000;

/**
 * --detach-timeout: ample for an ACPI unplug under nested TCG (0.5-1.2 s seen). The
 * firmware VM's detach waits it out, but while the other L2 boots, so it costs nothing.
 */
const DETACH_TIMEOUT_MS = 10_000;

const CHECKOUT = path.resolve(__dirname, "../../..");
/** --state-dir of the managed vfiods (L1's own tmpfs, as /run/vfiod on a host). */
const STATE_DIR = "/run/lab/vfiod-state";
/** How long the kernel may take to bind the managed NIC (vfiod's own bound is 10 s). */
const BIND_MS = 30_000;

class Abort extends Error {}

/** The steps so far; result.json is rewritten after each, so a killed L1 leaves them behind. */
class Recorder {
  private readonly t0 = Date.now();
  private readonly steps: Step[] = [];
  private complete = false;

  constructor(
    private readonly config: LabConfig,
    private readonly companions: string[],
  ) {}

  get labConfig(): LabConfig {
    return this.config;
  }

  /**
   * Runs one step: `run` does it and returns what it saw. The plan is that it
   * succeeds or, with `refusal`, that it fails with that reason. A step not as
   * planned stops its track unless `keepGoing` (later steps do not depend on it).
   * `since` moves the start back (the L2 boot counts from QEMU's start).
   */
  async step<N extends StepName>(
    name: N,
    deadlineMs: number,
    run: () => Promise<StepValues[N]>,
    options: { refusal?: string; since?: number; keepGoing?: boolean } = {},
  ): Promise<StepValues[N]> {
    const start = options.since ?? Date.now();
    const record: Step<N> = { name, ms: 0, at: 0, deadlineMs, ok: false };
    try {
      record.value = await run();
      record.ok = options.refusal === undefined;
      if (!record.ok) record.error = `expected a refusal with reason ${options.refusal}, but the call succeeded`;
    } catch (err) {
      const failure = callFailure(err);
      if (failure !== undefined) record.failure = failure;
      record.ok = options.refusal !== undefined && failure?.reason === options.refusal;
      if (!record.ok) record.error = err instanceof Error ? err.message : String(err);
    }
    record.ms = Date.now() - start;
    record.at = Date.now() - this.t0;
    this.steps.push(record as Step);
    print(`${record.ok ? "ok  " : "FAIL"} ${name} (${seconds(record.ms)}) ${summary(record)}`);
    this.save();
    if (!record.ok && !options.keepGoing) throw new Abort(`${name} did not go as planned`);
    return record.value as StepValues[N];
  }

  finish(): LabResult {
    this.complete = true;
    return this.save();
  }

  private managedTimings(): ManagedTimings {
    const ok = <N extends StepName>(name: N) => this.steps.find((s): s is Step<N> => s.name === name && s.ok);
    const detach = ok("managed detach NIC");
    const back = ok("L1 driver owns managed NIC again");
    return {
      attachMs: ok("managed attach NIC")?.ms ?? -1,
      detachMs: detach?.ms ?? -1,
      backOnHostDriverMs: detach !== undefined && back?.value !== undefined ? detach.ms + back.value.waitedMs : -1,
      bindMs: ok("managed attach to the hung VM: bound, not attached")?.value?.boundAfterMs ?? -1,
      repairRestoreMs: ok("restarted vfiod put the device back")?.value?.restoreMs ?? -1,
    };
  }

  private save(): LabResult {
    const result: LabResult = {
      ok: this.complete && this.steps.every((s) => s.ok),
      config: this.config,
      companions: this.companions,
      detachTimeoutMs: DETACH_TIMEOUT_MS,
      managedTimings: this.managedTimings(),
      steps: this.steps,
    };
    fs.writeFileSync(path.join(this.config.out, "result.json"), `${JSON.stringify(result, null, 2)}\n`);
    return result;
  }
}

interface Vfiod {
  client: DeviceClient;
  child: ChildProcess;
  exited: Promise<{ exitCode: number | null; signal: string | null }>;
}

async function main(): Promise<void> {
  const configPath = process.argv[2];
  if (configPath === undefined) throw new Error("usage: l1-driver.js <lab.json>");
  const config = JSON.parse(fs.readFileSync(configPath, "utf8")) as LabConfig;
  const nonViable = config.devices.nonViable;
  const groupDir = `/sys/bus/pci/devices/${nonViable}/iommu_group/devices`;
  const companions = fs.readdirSync(groupDir).filter((bdf) => bdf !== nonViable);
  const lab = new Recorder(config, companions);
  print(`node ${process.version}; vfiod from ${CHECKOUT}`);

  writeInventory(config);
  // A VM whose hypervisor never answers: a managed Attach to it binds, then hangs.
  const hung = net.createServer((socket) => socket.on("error", () => undefined)).listen(config.vms.hung.qmp);
  const managedArgs = ["--manage-binding", "--allow-devices", allowedDevices(config), "--state-dir", STATE_DIR];
  // While L2 boots: a vfiod that is killed mid-attach, and one without --manage-binding, at once.
  const [first, plain] = await Promise.all([
    startVfiod(lab, "vfiod ready (to be killed)", managedArgs, "vfiod-killed.log"),
    startVfiod(lab, "vfiod ready (without --manage-binding)", ["--state-dir", `${STATE_DIR}-plain`], "vfiod-plain.log"),
  ]);
  await unmanagedTrack(lab, config, plain);
  await crashTrack(lab, config, first);
  hung.close();
  // The lab's vfiod, for all VMs, as on a real host (each VM has its own QMP socket); it
  // repairs what the killed one left before it listens.
  const vfiod = await startVfiod(lab, "vfiod ready", managedArgs, "vfiod.log");
  let finished = false;
  try {
    await repairedStep(lab, config);
    const booted = deferred();
    // The firmware VM needs no guest, so its steps run while the other L2 boots; so do managed refusals.
    const tracks = await Promise.allSettled([
      bootTrack(lab, config, vfiod.client, booted),
      firmwareTrack(lab, config, vfiod.client),
      managedTrack(lab, config, vfiod.client, booted.promise, companions[0] ?? nonViable),
    ]);
    for (const t of tracks) if (t.status === "rejected" && !(t.reason instanceof Abort)) throw t.reason;
    finished = tracks.every((t) => t.status === "fulfilled");
  } finally {
    await stopVfiod(lab, vfiod, "vfiod stops");
    const result = finished ? lab.finish() : undefined;
    printLatencies(result);
    print(result?.ok ? "lab passed" : "lab FAILED");
    process.exitCode = result?.ok ? 0 : 1;
  }
}

/** The booting VM: empty List, preflight refusal, then attach, see, list, detach, see go. */
async function bootTrack(lab: Recorder, config: LabConfig, c: DeviceClient, booted: Deferred): Promise<void> {
  const vm = config.vms.boot.name;
  const serial = config.vms.boot.serial;
  const list = () => listed(c, vm);

  await lab.step("list l2 before attach", LIST_MS, list);
  // vfiod's own preflight, so the VM need not have booted.
  await lab.step(
    "attach 00:1f.2 (non-viable group)",
    ATTACH_MS,
    async () => attached(await c.attach({ vm, pci: config.devices.nonViable }, { timeoutMs: ATTACH_MS })),
    { refusal: "IOMMU_GROUP_NOT_VIABLE", keepGoing: true },
  );
  try {
    await lab.step(
      "L2 guest booted",
      L2_BOOT_MS,
      async () => ({ line: await waitForLine(serial, /^L2-READY.*$/m, 0, config.l2StartedAtMs + L2_BOOT_MS) }),
      { since: config.l2StartedAtMs },
    );
    booted.resolve();
  } catch (err) {
    booted.reject(err);
    throw err;
  }

  const attachAndSee = async (name: "NIC" | "NVMe", device: LabPciDevice, pci: string, id?: string) => {
    const from = fileSize(serial);
    const { device: got } = await lab.step(`attach ${name}`, ATTACH_MS, async () =>
      attached(await c.attach({ vm, pci, id }, { timeoutMs: ATTACH_MS })),
    );
    await lab.step(`L2 guest sees ${name}`, GUEST_MS, () => guestLine(serial, "ADD", device, from));
    return got;
  };
  const detachAndSee = async (name: "NIC" | "NVMe", device: LabPciDevice, id: string) => {
    const from = fileSize(serial);
    await lab.step(`detach ${name}`, DETACH_MS, () => detached(c, vm, id));
    await lab.step(`L2 guest lost ${name}`, GUEST_MS, () => guestLine(serial, "DEL", device, from));
  };

  const { nic, nvme } = config.devices;
  // Both accepted forms of a BDF: the short one with the NIC, the full one with the NVMe,
  // and one id chosen by the caller, one left to vfiod.
  const nicDevice = await attachAndSee("NIC", nic, nic.bdf.replace(/^0000:/, ""), "lab-nic");
  // The kernel's view: l2's QEMU holds the NIC's group open, so vfiod refuses before l2fw's QEMU is asked.
  await lab.step(
    "attach NIC to l2fw while l2 holds it",
    ATTACH_MS,
    async () => attached(await c.attach({ vm: config.vms.firmware.name, pci: nic.bdf, id: "lab-nic2" }, { timeoutMs: ATTACH_MS })),
    { refusal: "DEVICE_IN_USE", keepGoing: true },
  );
  const nvmeDevice = await attachAndSee("NVMe", nvme, nvme.bdf);
  await lab.step("list l2 with both", LIST_MS, list);
  await detachAndSee("NIC", nic, nicDevice.id);
  await detachAndSee("NVMe", nvme, nvmeDevice.id);
  await lab.step("list l2 after detach", LIST_MS, list);

  // A GPU and its audio function in miniature: one call adds both, one removes both.
  const [primary, audio] = config.devices.group;
  const seeBoth = (what: "ADD" | "DEL", from: number) => async () => ({
    lines: await Promise.all([guestLine(serial, what, primary, from), guestLine(serial, what, audio, from)]),
  });
  let from = fileSize(serial);
  const group = await lab.step("whole-group attach", ATTACH_MS, async () => {
    const response = await c.attach({ vm, pci: primary.bdf, id: "lab-group", wholeGroup: true }, { timeoutMs: ATTACH_MS });
    return { ...attached(response), companions: response.companions.map(plainDevice) };
  });
  await lab.step("L2 guest sees the whole group", GUEST_MS, seeBoth("ADD", from));
  await lab.step("list l2 with the group", LIST_MS, list);
  from = fileSize(serial);
  await lab.step("whole-group detach", DETACH_MS, async () => {
    await c.detach({ vm, id: group.device.id, wholeGroup: true }, { timeoutMs: DETACH_MS });
    return {};
  });
  await lab.step("L2 guest lost the whole group", GUEST_MS, seeBoth("DEL", from));
  await lab.step("list l2 after whole-group detach", LIST_MS, list);

  // All or nothing, on real QEMU: with the companion's derived id taken (by the NIC), QEMU takes the
  // requested function, the companion is refused, and vfiod takes the requested function out again.
  const taken = await lab.step("attach NIC under the companion's id", ATTACH_MS, async () =>
    attached(await c.attach({ vm, pci: nic.bdf, id: companionId("lab-group", audio.bdf) }, { timeoutMs: ATTACH_MS })),
  );
  from = fileSize(serial);
  await lab.step(
    "whole-group attach meets a taken companion id",
    ATTACH_MS,
    async () => attached(await c.attach({ vm, pci: primary.bdf, id: "lab-group", wholeGroup: true }, { timeoutMs: ATTACH_MS })),
    { refusal: "ID_IN_USE", keepGoing: true },
  );
  await lab.step("L2 guest saw the requested function come and go", GUEST_MS, async () => ({
    lines: [await guestLine(serial, "ADD", primary, from), await guestLine(serial, "DEL", primary, from)],
  }));
  await lab.step("list l2 after the rollback", LIST_MS, list);
  await lab.step("detach NIC under the companion's id", DETACH_MS, () => detached(c, vm, taken.device.id));
}

/** The firmware-only VM: attach works, detach stays pending, List still has it. */
async function firmwareTrack(lab: Recorder, config: LabConfig, c: DeviceClient): Promise<void> {
  const vm = config.vms.firmware.name;
  const { device } = await lab.step("attach spare to l2fw", ATTACH_MS, async () =>
    attached(await c.attach({ vm, pci: config.devices.spare.bdf, id: "lab-fw" }, { timeoutMs: ATTACH_MS })),
  );
  await lab.step("detach from l2fw", DETACH_MS, () => detached(c, vm, device.id), {
    refusal: "DETACH_PENDING",
    keepGoing: true,
  });
  await lab.step("list l2fw after detach", LIST_MS, () => listed(c, vm));
}

/** The managed NIC's three refusals that need no guest (while l2 boots), then attach, see, detach, driver back. */
async function managedTrack(lab: Recorder, config: LabConfig, c: DeviceClient, booted: Promise<void>, outside: string): Promise<void> {
  const { managed } = config.devices;
  const vm = config.vms.boot.name;
  const serial = config.vms.boot.serial;
  // Up, the interface is the host's: refused, naming it (the real kernel's flags, no carrier needed).
  await lab.step(
    "managed attach while its interface is up",
    ATTACH_MS,
    async () => {
      // Its name now: the restart's restore re-created it (the kernel may have named it anew).
      const name = hostState(managed.bdf).interfaces[0] ?? managed.interface;
      ip("link", "set", "dev", name, "up");
      try {
        return attached(await c.attach({ vm, pci: managed.bdf, id: "lab-busy", managed: true }, { timeoutMs: ATTACH_MS }));
      } finally {
        ip("link", "set", "dev", name, "down");
      }
    },
    { refusal: "DEVICE_BUSY_ON_HOST", keepGoing: true },
  );
  // A device on a host driver outside --allow-devices (a member of the 00:1f group): refused before any write.
  const before = hostState(outside);
  await lab.step(
    "managed attach outside --allow-devices",
    ATTACH_MS,
    async () => attached(await c.attach({ vm, pci: outside, id: "lab-outside", managed: true }, { timeoutMs: ATTACH_MS })),
    { refusal: "DEVICE_NOT_ALLOWED", keepGoing: true },
  );
  await lab.step(
    "device outside --allow-devices untouched",
    LIST_MS,
    async () => {
      const after = hostState(outside);
      if (JSON.stringify(after) !== JSON.stringify(before)) throw new Error(`${outside} changed: ${JSON.stringify({ before, after })}`);
      return { before, after };
    },
    { keepGoing: true },
  );
  await booted;
  const added = fileSize(serial);
  const { device } = await lab.step("managed attach NIC", ATTACH_MS, async () =>
    attached(await c.attach({ vm, pci: managed.bdf, id: "lab-managed", managed: true }, { timeoutMs: ATTACH_MS })),
  );
  await lab.step("managed NIC on vfio-pci in L1", LIST_MS, async () => {
    const state = hostState(managed.bdf);
    if (state.driver !== "vfio-pci") throw new Error(`attached, but on ${state.driver ?? "no driver"} in L1`);
    return state;
  });
  await lab.step("L2 guest sees managed NIC", GUEST_MS, () => guestLine(serial, "ADD", managed, added));
  const removed = fileSize(serial);
  await lab.step("managed detach NIC", DETACH_MS, () => detached(c, vm, device.id));
  await lab.step("L1 driver owns managed NIC again", GUEST_MS, async () => {
    const started = Date.now();
    const state = await waitForHost(managed.bdf, (s) => s.driver === managed.hostDriver && s.interfaces.length > 0, GUEST_MS);
    return { ...state, waitedMs: Date.now() - started };
  });
  await lab.step("L2 guest lost managed NIC", GUEST_MS, () => guestLine(serial, "DEL", managed, removed));
}

/** Without --manage-binding, managed is BINDING_DISABLED and the device stays as it is. */
async function unmanagedTrack(lab: Recorder, config: LabConfig, plain: Vfiod): Promise<void> {
  const { managed } = config.devices;
  await lab.step(
    "managed attach without --manage-binding",
    ATTACH_MS,
    async () =>
      attached(await plain.client.attach({ vm: config.vms.boot.name, pci: managed.bdf, id: "lab-plain", managed: true }, { timeoutMs: ATTACH_MS })),
    { refusal: "BINDING_DISABLED", keepGoing: true },
  );
  await lab.step(
    "device untouched after BINDING_DISABLED",
    LIST_MS,
    async () => {
      const state = hostState(managed.bdf);
      if (state.driver !== managed.hostDriver || state.override !== "(null)") throw new Error(`changed: ${JSON.stringify(state)}`);
      return state;
    },
    { keepGoing: true },
  );
  await stopVfiod(lab, plain, "vfiod without --manage-binding stops");
}

/** A managed Attach to the hung VM binds the NIC, then waits for QEMU: vfiod is killed right then. */
async function crashTrack(lab: Recorder, config: LabConfig, first: Vfiod): Promise<void> {
  const { managed } = config.devices;
  const call = first.client
    .attach({ vm: config.vms.hung.name, pci: managed.bdf, id: "lab-crash", managed: true }, { timeoutMs: ATTACH_MS })
    .catch((err: unknown) => err);
  await lab.step("managed attach to the hung VM: bound, not attached", BIND_MS, async () => {
    const started = Date.now();
    const state = await waitForHost(managed.bdf, (s) => s.driver === "vfio-pci" && hasGroupNode(managed.bdf), BIND_MS);
    return { ...state, boundAfterMs: Date.now() - started, stateFiles: fs.readdirSync(STATE_DIR) };
  });
  await lab.step("vfiod killed mid-attach", STOP_MS, async () => {
    first.child.kill("SIGKILL");
    const exit = await first.exited;
    if (exit.signal !== "SIGKILL") throw new Error(`exited with ${exit.exitCode ?? exit.signal}, not by SIGKILL`);
    return exit;
  });
  await call;
  first.client.close();
}

/** The lab's vfiod repaired the killed one's half-done bind before it listened. */
async function repairedStep(lab: Recorder, config: LabConfig): Promise<void> {
  const { managed } = config.devices;
  await lab.step(
    "restarted vfiod put the device back",
    GUEST_MS,
    async () => {
      // The driver is back before vfiod listens; its interface may take a moment to register.
      const state = await waitForHost(managed.bdf, (s) => s.driver === managed.hostDriver && s.interfaces.length > 0, GUEST_MS);
      const line = vfiodLog(config, "vfiod.log").find((l) => l.msg === "managed binding: driver restored" && l.device === managed.bdf);
      if (line === undefined) throw new Error("vfiod.log has no 'managed binding: driver restored' line for it");
      return { ...state, stateFiles: fs.readdirSync(STATE_DIR), restoreMs: Number(line.ms), logLine: JSON.stringify(line) };
    },
    { keepGoing: true },
  );
}

function writeInventory(config: LabConfig): void {
  const vms = Object.values(config.vms).map((vm) => ({ name: vm.name, hypervisor: "qemu", socket: vm.qmp }));
  fs.writeFileSync(path.join(config.out, "inventory.json"), JSON.stringify({ vms }));
}

/** Every device the lab attaches, by vendor:device, and 00:1f.2 by BDF: the 00:1f group's others are outside. */
function allowedDevices(config: LabConfig): string {
  const { nic, nvme, spare, managed, nonViable, group } = config.devices;
  return [nic, nvme, spare, managed, ...group].map((d) => d.vendorDevice).concat(nonViable).join(",");
}

/**
 * Starts a vfiod on a port of L1's loopback the kernel picks, ready once its log says
 * it serves (with the port). Not a fixed port polled with connects: a port in the
 * ephemeral range, polled while nothing listens, is eventually a poll's own source
 * port, and the poll connects to itself (TCP self-connect) and keeps vfiod from binding.
 */
async function startVfiod(
  lab: Recorder,
  step: "vfiod ready" | "vfiod ready (to be killed)" | "vfiod ready (without --manage-binding)",
  extra: string[],
  logName: string,
): Promise<Vfiod> {
  const config = lab.labConfig;
  const inventory = path.join(config.out, "inventory.json");
  const log = fs.openSync(path.join(config.out, logName), "w");
  // An empty --cocoon-root: VMs of this machine's cocoon must not join the lab's inventory.
  const args = [
    path.join(CHECKOUT, "dist/src/main.js"),
    ...["--listen", "127.0.0.1:0", "--inventory", inventory, "--sysfs-root", "/"],
    ...["--detach-timeout", `${DETACH_TIMEOUT_MS / 1000}s`, "--cocoon-root", "/run/lab/no-cocoon"],
    ...extra,
  ];
  const child = spawn(process.execPath, args, { stdio: ["ignore", log, log] });
  fs.closeSync(log);
  const exited = new Promise<{ exitCode: number | null; signal: string | null }>((resolve) =>
    child.once("exit", (exitCode, signal) => resolve({ exitCode, signal })),
  );
  const { port } = await lab.step(step, READY_MS, async () => {
    const deadline = Date.now() + READY_MS;
    let gone = false;
    void exited.then(() => (gone = true));
    for (;;) {
      const serving = vfiodLog(config, logName).find((line) => line.msg === "vfiod serving");
      if (serving !== undefined) return { pid: child.pid ?? -1, port: Number(serving.port) };
      if (gone) throw new Error(`vfiod exited before serving; see ${logName}`);
      if (Date.now() > deadline) throw new Error(`not serving after ${READY_MS} ms; see ${logName}`);
      await sleep(200);
    }
  });
  return { client: createDeviceClient(`127.0.0.1:${port}`), child, exited };
}

/** SIGTERM, which the contract says drains and exits 0. */
async function stopVfiod(lab: Recorder, vfiod: Vfiod, step: "vfiod stops" | "vfiod without --manage-binding stops"): Promise<void> {
  vfiod.client.close();
  await lab.step(
    step,
    STOP_MS,
    async () => {
      vfiod.child.kill("SIGTERM");
      // unref: a pending timer would hold the driver's exit back by STOP_MS.
      const timer = sleep(STOP_MS, undefined, { ref: false });
      const exit = await Promise.race([vfiod.exited, timer]);
      if (exit === undefined) {
        vfiod.child.kill("SIGKILL");
        throw new Error(`still running ${STOP_MS} ms after SIGTERM; killed`);
      }
      if (exit.exitCode !== 0) throw new Error(`exited with ${exit.exitCode ?? exit.signal}`);
      return exit;
    },
    { keepGoing: true },
  );
}

/** The guest's L2-PCI-ADD / L2-PCI-DEL line for this device, written after `from`. */
async function guestLine(serial: string, what: "ADD" | "DEL", device: LabPciDevice, from: number): Promise<GuestLine> {
  const pattern = new RegExp(`^L2-PCI-${what} \\S+ ${device.vendorDevice} .*$`, "m");
  const line = await waitForLine(serial, pattern, from, Date.now() + GUEST_MS);
  return { guestBdf: line.split(" ")[1] ?? "", line };
}

/** The first whole line after byte `from` that matches; `pattern` matches one line (flag m). */
async function waitForLine(file: string, pattern: RegExp, from: number, deadline: number): Promise<string> {
  for (;;) {
    // QEMU writes the guest's console byte by byte: drop a line still being written.
    const text = fs.readFileSync(file).subarray(from).toString("utf8").replace(/\r/g, "");
    const match = pattern.exec(text.slice(0, text.lastIndexOf("\n") + 1));
    if (match !== null) return match[0];
    if (Date.now() > deadline) throw new Error(`${pattern} did not appear in ${file}`);
    await sleep(250);
  }
}

function fileSize(file: string): number {
  return fs.statSync(file).size;
}

/** A device's driver, override and interfaces, from L1's sysfs. */
function hostState(bdf: string): HostDriverState {
  const dir = `/sys/bus/pci/devices/${bdf}`;
  let driver: string | null = null;
  try {
    driver = path.basename(fs.readlinkSync(path.join(dir, "driver")));
  } catch {
    // unbound
  }
  const override = fs.readFileSync(path.join(dir, "driver_override"), "utf8").trim();
  const interfaces = fs.existsSync(path.join(dir, "net")) ? fs.readdirSync(path.join(dir, "net")).sort() : [];
  return { bdf, driver, override, interfaces };
}

async function waitForHost(bdf: string, done: (state: HostDriverState) => boolean, ms: number): Promise<HostDriverState> {
  const deadline = Date.now() + ms;
  for (;;) {
    const state = hostState(bdf);
    if (done(state)) return state;
    if (Date.now() > deadline) throw new Error(`not as expected after ${ms} ms: ${JSON.stringify(state)}`);
    await sleep(100);
  }
}

function hasGroupNode(bdf: string): boolean {
  const group = path.basename(fs.readlinkSync(`/sys/bus/pci/devices/${bdf}/iommu_group`));
  return fs.existsSync(`/dev/vfio/${group}`);
}

/** `ip` from the machine's root (iproute2), failing loudly. */
function ip(...args: string[]): void {
  const run = spawnSync("ip", args, { encoding: "utf8" });
  if (run.status !== 0) throw new Error(`ip ${args.join(" ")}: ${run.stderr.trim() || run.error?.message}`);
}

/** vfiod's JSON log lines. */
function vfiodLog(config: LabConfig, name: string): Record<string, unknown>[] {
  return fs
    .readFileSync(path.join(config.out, name), "utf8")
    .split("\n")
    .slice(0, -1) // a line still being written
    .filter((line) => line.startsWith("{"))
    .map((line) => JSON.parse(line) as Record<string, unknown>);
}

interface Deferred {
  readonly promise: Promise<void>;
  resolve(): void;
  reject(err: unknown): void;
}

function deferred(): Deferred {
  let resolve!: () => void;
  let reject!: (err: unknown) => void;
  const promise = new Promise<void>((yes, no) => {
    resolve = yes;
    reject = no;
  });
  promise.catch(() => undefined);
  return { promise, resolve, reject };
}

async function listed(c: DeviceClient, vm: string): Promise<{ devices: LabDevice[] }> {
  return { devices: (await c.list({ vm }, { timeoutMs: LIST_MS })).devices.map(plainDevice) };
}

async function detached(c: DeviceClient, vm: string, id: string): Promise<Record<string, never>> {
  await c.detach({ vm, id }, { timeoutMs: DETACH_MS });
  return {};
}

function attached(response: { device?: LabDevice }): { device: LabDevice } {
  if (response.device === undefined) throw new Error("Attach answered without a device");
  return { device: plainDevice(response.device) };
}

function plainDevice(d: LabDevice): LabDevice {
  return { id: d.id, bdf: d.bdf, path: d.path, guestBdf: d.guestBdf };
}

function callFailure(err: unknown): CallFailure | undefined {
  const e = err as Partial<grpc.ServiceError>;
  if (typeof e.code !== "number" || typeof e.details !== "string") return undefined;
  const reason = errorReason(err);
  return { code: e.code, details: e.details, ...(reason === undefined ? {} : { reason }) };
}

function summary(step: Step): string {
  const f = step.failure;
  const seen = f === undefined ? JSON.stringify(step.value ?? {}) : `${grpc.status[f.code]} ${f.reason ?? "(no reason)"}: ${f.details}`;
  return (step.error === undefined ? seen : `${step.error}; ${seen}`).slice(0, 400);
}

function printLatencies(result: LabResult | undefined): void {
  if (result === undefined) return;
  const of = (name: StepName) => {
    const s = result.steps.find((x) => x.name === name);
    return s === undefined ? "-" : seconds(s.ms);
  };
  print(
    `latencies: L2 boot ${of("L2 guest booted")}; attach NIC ${of("attach NIC")}, NVMe ${of("attach NVMe")}, ` +
      `l2fw ${of("attach spare to l2fw")}; guest sees ${of("L2 guest sees NIC")}/${of("L2 guest sees NVMe")}; ` +
      `detach NIC ${of("detach NIC")}, NVMe ${of("detach NVMe")}, l2fw (pending) ${of("detach from l2fw")}; ` +
      `guest lost ${of("L2 guest lost NIC")}/${of("L2 guest lost NVMe")}; refusal ${of("attach 00:1f.2 (non-viable group)")}`,
  );
  const m = result.managedTimings;
  const ms = (value: number) => (value < 0 ? "-" : seconds(value));
  print(
    `managed binding: attach (bind + device_add) ${ms(m.attachMs)}; detach (device_del + restore) ${ms(m.detachMs)}; ` +
      `back on ${result.config.devices.managed.hostDriver} with its interface ${ms(m.backOnHostDriverMs)} after Detach began; ` +
      `bind alone ${ms(m.bindMs)}; restore at restart after a kill ${ms(m.repairRestoreMs)}; ` +
      `guest sees ${of("L2 guest sees managed NIC")}; refusals: interface up ${of("managed attach while its interface is up")}, ` +
      `outside allow-list ${of("managed attach outside --allow-devices")}, BINDING_DISABLED ${of("managed attach without --manage-binding")}`,
  );
}

function seconds(ms: number): string {
  return `${(ms / 1000).toFixed(2)}s`;
}

function print(line: string): void {
  process.stdout.write(`LAB driver: ${line}\n`);
}

main()
  .catch((err: unknown) => {
    if (err instanceof Abort) print(`lab FAILED: ${err.message}`);
    else print(`crashed: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}`);
    process.exitCode = 1;
  })
  // Whatever a failed step left open (the hung VM's socket, a vfiod, a pending call) must
  // not keep L1 up until lab.sh's timeout: L1 powers off once the driver exits.
  .finally(() => process.exit());
