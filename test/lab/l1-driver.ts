// The lab's driver, run inside L1 by l1-main.sh with lab.json. Starts vfiod as a
// real process serving both L2 QEMUs and drives it only through its gRPC API,
// with real vfio-pci devices. Prints each step with its timing ("LAB " lines
// reach the lab's output) and records them in <out>/result.json for lab.test.ts.
import * as grpc from "@grpc/grpc-js";
import { spawn, type ChildProcess } from "node:child_process";
import fs from "node:fs";
import net from "node:net";
import path from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { createDeviceClient, errorReason, type DeviceClient } from "../../src/grpc/client";
import type {
  CallFailure,
  GuestLine,
  LabConfig,
  LabDevice,
  LabPciDevice,
  LabResult,
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
/** vfiod listens on 127.0.0.1 here (L1's loopback). */
const VFIOD_PORT = 50051;

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

  private save(): LabResult {
    const result: LabResult = {
      ok: this.complete && this.steps.every((s) => s.ok),
      config: this.config,
      companions: this.companions,
      detachTimeoutMs: DETACH_TIMEOUT_MS,
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

  // One vfiod for both VMs, as on a real host (each VM has its own QMP socket).
  const vfiod = await startVfiod(lab, config);
  let finished = false;
  try {
    // The firmware VM needs no guest, so its steps run while the other L2 boots.
    const tracks = await Promise.allSettled([
      bootTrack(lab, config, vfiod.client),
      firmwareTrack(lab, config, vfiod.client),
    ]);
    for (const t of tracks) if (t.status === "rejected" && !(t.reason instanceof Abort)) throw t.reason;
    finished = tracks.every((t) => t.status === "fulfilled");
  } finally {
    await stopVfiod(lab, vfiod);
    const result = finished ? lab.finish() : undefined;
    printLatencies(result);
    print(result?.ok ? "lab passed" : "lab FAILED");
    process.exitCode = result?.ok ? 0 : 1;
  }
}

/** The booting VM: empty List, preflight refusal, then attach, see, list, detach, see go. */
async function bootTrack(lab: Recorder, config: LabConfig, c: DeviceClient): Promise<void> {
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
  await lab.step(
    "L2 guest booted",
    L2_BOOT_MS,
    async () => ({ line: await waitForLine(serial, /^L2-READY.*$/m, 0, config.l2StartedAtMs + L2_BOOT_MS) }),
    { since: config.l2StartedAtMs },
  );

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

async function startVfiod(lab: Recorder, config: LabConfig): Promise<Vfiod> {
  const inventory = path.join(config.out, "inventory.json");
  const vms = Object.values(config.vms).map((vm) => ({ name: vm.name, hypervisor: "qemu", socket: vm.qmp }));
  fs.writeFileSync(inventory, JSON.stringify({ vms }));
  const log = fs.openSync(path.join(config.out, "vfiod.log"), "w");
  const listen = `127.0.0.1:${VFIOD_PORT}`;
  // An empty --cocoon-root: VMs of this machine's cocoon must not join the lab's inventory.
  const args = [
    path.join(CHECKOUT, "dist/src/main.js"),
    ...["--listen", listen, "--inventory", inventory, "--sysfs-root", "/"],
    ...["--detach-timeout", `${DETACH_TIMEOUT_MS / 1000}s`, "--cocoon-root", "/run/lab/no-cocoon"],
  ];
  const child = spawn(process.execPath, args, { stdio: ["ignore", log, log] });
  fs.closeSync(log);
  const exited = new Promise<{ exitCode: number | null; signal: string | null }>((resolve) =>
    child.once("exit", (exitCode, signal) => resolve({ exitCode, signal })),
  );
  await lab.step("vfiod ready", READY_MS, async () => {
    const deadline = Date.now() + READY_MS;
    let gone = false;
    void exited.then(() => (gone = true));
    while (!(await accepts(VFIOD_PORT))) {
      if (gone) throw new Error("vfiod exited before listening; see vfiod.log");
      if (Date.now() > deadline) throw new Error(`not listening on ${listen} after ${READY_MS} ms`);
      await sleep(200);
    }
    return { pid: child.pid ?? -1 };
  });
  return { client: createDeviceClient(listen), child, exited };
}

/** SIGTERM, which the contract says drains and exits 0. */
async function stopVfiod(lab: Recorder, vfiod: Vfiod): Promise<void> {
  vfiod.client.close();
  await lab.step(
    "vfiod stops",
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

function accepts(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = net.connect(port, "127.0.0.1");
    socket.once("connect", () => {
      socket.destroy();
      resolve(true);
    });
    socket.once("error", () => resolve(false));
  });
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
}

function seconds(ms: number): string {
  return `${(ms / 1000).toFixed(2)}s`;
}

function print(line: string): void {
  process.stdout.write(`LAB driver: ${line}\n`);
}

main().catch((err: unknown) => {
  if (err instanceof Abort) print(`lab FAILED: ${err.message}`);
  else print(`crashed: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}`);
  process.exitCode = 1;
});
