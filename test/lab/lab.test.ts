// The VFIO lab (README.md here) under npm test: lab.sh boots a TCG guest with an
// emulated IOMMU, binds its emulated devices to vfio-pci, and l1-driver.ts drives
// a real vfiod over gRPC against real QEMU guests. Each expectation is asserted on
// result.json on its own. Skipped, saying why, with VFIOD_SKIP_LAB=1 (an explicit
// opt-out, also in CI); outside CI also without root, without QEMU or when the Debian
// archive is out of reach, which in CI (CI=true) fail instead (../support/skip.ts).
import { status } from "@grpc/grpc-js";
import { spawn, spawnSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { skipOutsideCi } from "../support/skip";
import type { LabResult, Step, StepName, StepValues } from "./result";

const LAB_SH = path.join(__dirname, "lab.sh");
const LAB_ENV = { ...process.env, VFIOD_LAB_DIR: process.env.VFIOD_LAB_DIR ?? "/var/tmp/vfiod-lab" };
const RESULT = path.join(LAB_ENV.VFIOD_LAB_DIR, "out", "result.json");
/** Above lab.sh's own bound on L1 (480 s) plus a first download; lab.sh is stopped then. */
const LAB_MS = 14 * 60_000;

/** Why the lab cannot run here, or undefined. @throws in CI, for anything but VFIOD_SKIP_LAB=1. */
function whySkip(): string | undefined {
  if (process.env.VFIOD_SKIP_LAB === "1") {
    process.stderr.write("VFIO lab skipped: VFIOD_SKIP_LAB=1\n");
    return "VFIOD_SKIP_LAB=1";
  }
  const missing = (why: string): string => {
    skipOutsideCi("the VFIO lab", why);
    return why;
  };
  if (process.getuid?.() !== 0) return missing("not root: L1 reads this machine's whole root over 9p");
  const onPath = (bin: string) =>
    (process.env.PATH ?? "").split(":").some((dir) => dir !== "" && fs.existsSync(path.join(dir, bin)));
  if (!onPath("qemu-system-x86_64")) return missing("qemu-system-x86_64 is not installed");
  // Decided here because jest cannot skip once a test runs. Cached after the first time.
  const fetch = spawnSync("bash", [LAB_SH, "fetch"], { env: LAB_ENV, encoding: "utf8", timeout: 10 * 60_000 });
  if (fetch.status === 0) return undefined;
  const said = (fetch.stdout.trim() || fetch.stderr.trim() || fetch.error?.message || "no output").split("\n").pop();
  return missing(`cannot fetch the Debian kernel and busybox: ${said}`);
}

interface LabRun {
  exitCode: number | null;
  /** The last lines lab.sh printed, for failure messages. */
  tail: string;
  result?: LabResult;
}

/** Runs lab.sh, streaming its step lines as they come so CI shows each with its timing. */
function runLab(): Promise<LabRun> {
  const child = spawn("bash", [LAB_SH, "run"], { env: LAB_ENV, stdio: ["ignore", "pipe", "pipe"] });
  const lines: string[] = [];
  const keep = (chunk: Buffer, to: NodeJS.WriteStream) => {
    to.write(chunk);
    lines.push(...chunk.toString("utf8").split("\n"));
    lines.splice(0, Math.max(0, lines.length - 60));
  };
  child.stdout.on("data", (chunk: Buffer) => keep(chunk, process.stdout));
  child.stderr.on("data", (chunk: Buffer) => keep(chunk, process.stderr));
  // SIGTERM lets lab.sh take L1 down with it.
  const term = setTimeout(() => child.kill("SIGTERM"), LAB_MS);
  const hard = setTimeout(() => child.kill("SIGKILL"), LAB_MS + 10_000);
  return new Promise((resolve) => {
    child.once("close", (exitCode) => {
      clearTimeout(term);
      clearTimeout(hard);
      const run: LabRun = { exitCode, tail: lines.join("\n") };
      if (fs.existsSync(RESULT)) run.result = JSON.parse(fs.readFileSync(RESULT, "utf8")) as LabResult;
      resolve(run);
    });
  });
}

function must(condition: boolean, message: string): asserts condition {
  if (condition) return;
  const err = new Error(message);
  // Point the report at the expectation that failed, not at this helper.
  Error.captureStackTrace(err, must);
  throw err;
}

const skip = whySkip();
const describeLab = skip === undefined ? describe : describe.skip;

describeLab(`VFIO lab${skip === undefined ? "" : ` (skipped: ${skip})`}`, () => {
  let lab: LabRun;
  beforeAll(async () => {
    lab = await runLab();
  }, LAB_MS + 60_000);

  function result(): LabResult {
    must(lab.result !== undefined, `lab.sh exited ${lab.exitCode} without ${RESULT}: see "lab.sh passed" for why`);
    return lab.result;
  }
  /** The step, which must have happened; its value when it went as planned. */
  function step<N extends StepName>(name: N): Step<N> {
    const found = result().steps.find((s): s is Step<N> => s.name === name);
    must(found !== undefined, `step "${name}" never ran: an earlier step failed (see the lab output above)`);
    return found;
  }
  function value<N extends StepName>(name: N): StepValues[N] {
    const s = step(name);
    must(s.ok && s.value !== undefined, `step "${name}" failed after ${s.ms} ms: ${s.error ?? "no value"}`);
    return s.value;
  }
  const bdfs = (devices: { bdf: string }[]) => devices.map((d) => d.bdf).sort();

  test("List of the booting L2 is empty before any attach", () => {
    must(value("list l2 before attach").devices.length === 0, "l2 has VFIO devices before the lab attached any");
  });

  test("Attach of the NIC by its short BDF returns its full host BDF and the caller's id", () => {
    const { nic } = result().config.devices;
    const { device } = value("attach NIC");
    must(device.bdf === nic.bdf, `Attach of the NIC returned bdf ${device.bdf}, want ${nic.bdf}`);
    must(device.path === `/sys/bus/pci/devices/${nic.bdf}`, `Attach of the NIC returned path ${device.path}`);
    must(device.id === "lab-nic", `Attach of the NIC returned id ${device.id}, want lab-nic`);
  });

  test("Attach of the NVMe by its full BDF returns it, with an id vfiod chose", () => {
    const { nvme } = result().config.devices;
    const { device } = value("attach NVMe");
    must(device.bdf === nvme.bdf, `Attach of the NVMe returned bdf ${device.bdf}, want ${nvme.bdf}`);
    must(device.path === `/sys/bus/pci/devices/${nvme.bdf}`, `Attach of the NVMe returned path ${device.path}`);
    must(device.id !== "", "Attach without an id returned an empty id");
  });

  test("List shows both attached devices under their ids", () => {
    const listed = value("list l2 with both").devices;
    const attached = [value("attach NIC").device, value("attach NVMe").device];
    const want = attached.map((d) => `${d.id}=${d.bdf}`).sort();
    const got = listed.map((d) => `${d.id}=${d.bdf}`).sort();
    must(JSON.stringify(got) === JSON.stringify(want), `List shows ${got.join(", ")}; want ${want.join(", ")}`);
  });

  test.each(["NIC", "NVMe"] as const)("the L2 guest sees the %s appear where vfiod says", (name) => {
    const seen = value(`L2 guest sees ${name}`);
    const { device } = value(`attach ${name}`);
    must(device.guestBdf !== "", `vfiod reports no guest address for the ${name}; the guest printed "${seen.line}"`);
    must(
      device.guestBdf === seen.guestBdf,
      `vfiod says the guest has the ${name} at ${device.guestBdf}; the guest printed "${seen.line}"`,
    );
  });

  test("Attach of the NIC to l2fw while l2's QEMU holds it is refused by vfiod naming l2, before QEMU is asked", () => {
    const s = step("attach NIC to l2fw while l2 holds it");
    const f = s.failure;
    must(f !== undefined, `Attach of a held NIC was not refused: ${s.error ?? JSON.stringify(s.value)}`);
    must(f.code === status.FAILED_PRECONDITION, `refused with ${status[f.code]}, want FAILED_PRECONDITION: ${f.details}`);
    must(f.reason === "DEVICE_IN_USE", `refused with reason ${f.reason}, want DEVICE_IN_USE: ${f.details}`);
    must(f.details.includes("VM l2 "), `the refusal does not name l2: ${f.details}`);
    // vfiod's own words from the kernel's view; QEMU's refusal would carry "Device or resource busy".
    must(/its hypervisor \(pid \d+\) holds the IOMMU group open/.test(f.details), `not vfiod's kernel-view refusal: ${f.details}`);
  });

  test.each(["NIC", "NVMe"] as const)("Detach of the %s completes", (name) => {
    const s = step(`detach ${name}`);
    const f = s.failure;
    must(s.ok, `Detach of the ${name} failed after ${s.ms} ms: ${f ? `${status[f.code]} ${f.reason}: ${f.details}` : s.error}`);
  });

  test.each(["NIC", "NVMe"] as const)("the L2 guest sees the %s go", (name) => {
    const seen = value(`L2 guest sees ${name}`);
    const lost = value(`L2 guest lost ${name}`);
    must(lost.guestBdf === seen.guestBdf, `the ${name} came at ${seen.guestBdf} but "${lost.line}" went`);
  });

  test("List of the booting L2 is empty again after both detaches", () => {
    const left = value("list l2 after detach").devices;
    must(left.length === 0, `l2 still lists ${bdfs(left).join(", ")}`);
  });

  describe("whole group: two functions of one slot in one IOMMU group, as a GPU and its audio function", () => {
    test("whole-group Attach returns the requested function and its companion under the derived id", () => {
      const [primary, audio] = result().config.devices.group;
      const { device, companions } = value("whole-group attach");
      must(device.bdf === primary.bdf && device.id === "lab-group", `primary came back as ${JSON.stringify(device)}`);
      const want = `lab-group-${audio.bdf.slice(5).replace(/[:.]/g, "-")}=${audio.bdf}`;
      const got = companions.map((d) => `${d.id}=${d.bdf}`).join(", ");
      must(got === want, `companions ${got || "none"}; want ${want}`);
    });

    test("the L2 guest sees both functions appear where vfiod says", () => {
      const { device, companions } = value("whole-group attach");
      const seen = value("L2 guest sees the whole group").lines.map((l) => l.guestBdf).sort();
      const said = [device, ...companions].map((d) => d.guestBdf).sort();
      must(JSON.stringify(seen) === JSON.stringify(said), `the guest saw ${seen.join(", ")}; vfiod says ${said.join(", ")}`);
    });

    test("List shows both functions; whole-group Detach removes both, from List and from the guest", () => {
      const { group } = result().config.devices;
      const want = bdfs(group);
      const listed = bdfs(value("list l2 with the group").devices);
      must(JSON.stringify(listed) === JSON.stringify(want), `l2 lists ${listed.join(", ")}; want ${want.join(", ")}`);
      const s = step("whole-group detach");
      const f = s.failure;
      must(s.ok, `whole-group Detach failed after ${s.ms} ms: ${f ? `${status[f.code]} ${f.reason}: ${f.details}` : s.error}`);
      const came = value("L2 guest sees the whole group").lines.map((l) => l.guestBdf).sort();
      const went = value("L2 guest lost the whole group").lines.map((l) => l.guestBdf).sort();
      must(JSON.stringify(went) === JSON.stringify(came), `the guest lost ${went.join(", ")}; it had gained ${came.join(", ")}`);
      const left = value("list l2 after whole-group detach").devices;
      must(left.length === 0, `l2 still lists ${bdfs(left).join(", ")}`);
    });

    test("whole-group Attach whose companion's id is taken is refused, and the function QEMU had taken is removed again", () => {
      const [primary] = result().config.devices.group;
      const { nic } = result().config.devices;
      const s = step("whole-group attach meets a taken companion id");
      const f = s.failure;
      must(f !== undefined, `the whole-group Attach was not refused: ${s.error ?? JSON.stringify(s.value)}`);
      must(f.reason === "ID_IN_USE", `refused with reason ${f.reason}, want ID_IN_USE: ${f.details}`);
      must(f.details.includes(`rolled back: lab-group (${primary.bdf}) removed again`), `no rollback of ${primary.bdf} said: ${f.details}`);
      const [came, went] = value("L2 guest saw the requested function come and go").lines;
      must(came!.guestBdf === went!.guestBdf, `the guest gained ${primary.bdf} at ${came!.guestBdf} but "${went!.line}" went`);
      const left = value("list l2 after the rollback").devices.map((d) => `${d.id}=${d.bdf}`);
      const holder = `${value("attach NIC under the companion's id").device.id}=${nic.bdf}`;
      must(JSON.stringify(left) === JSON.stringify([holder]), `l2 lists ${left.join(", ")}; want only ${holder}`);
      must(step("detach NIC under the companion's id").ok, "the NIC holding the companion's id was not detached");
    });
  });

  test("Attach of 00:1f.2 (non-viable group) is refused by vfiod's preflight, naming its companions", () => {
    const { companions } = result();
    const s = step("attach 00:1f.2 (non-viable group)");
    const f = s.failure;
    must(f !== undefined, `Attach of 00:1f.2 was not refused: ${s.error ?? JSON.stringify(s.value)}`);
    must(f.code === status.FAILED_PRECONDITION, `refused with ${status[f.code]}, want FAILED_PRECONDITION: ${f.details}`);
    // A refusal QEMU had made would come back as HYPERVISOR_ERROR.
    must(f.reason === "IOMMU_GROUP_NOT_VIABLE", `refused with reason ${f.reason}, want IOMMU_GROUP_NOT_VIABLE: ${f.details}`);
    must(companions.length > 0, "the lab's 00:1f.2 has no group companions: the group cannot be non-viable");
    for (const c of companions) must(f.details.includes(c), `the message does not name companion ${c}: ${f.details}`);
  });

  test("firmware-only L2: Attach works", () => {
    const { spare } = result().config.devices;
    const { device } = value("attach spare to l2fw");
    must(device.bdf === spare.bdf, `Attach to l2fw returned bdf ${device.bdf}, want ${spare.bdf}`);
  });

  test("firmware-only L2: Detach answers DETACH_PENDING (DEADLINE_EXCEEDED) after its detach timeout, within its deadline", () => {
    const s = step("detach from l2fw");
    const f = s.failure;
    const waitMs = result().detachTimeoutMs;
    must(f !== undefined, `Detach from the firmware-only VM did not fail: ${s.error ?? ""}`);
    must(f.code === status.DEADLINE_EXCEEDED, `Detach answered ${status[f.code]}, want DEADLINE_EXCEEDED: ${f.details}`);
    // The client's own deadline would also say DEADLINE_EXCEEDED, but without a reason.
    must(f.reason === "DETACH_PENDING", `Detach answered reason ${f.reason}, want DETACH_PENDING: ${f.details}`);
    must(s.ms >= waitMs, `Detach answered after ${s.ms} ms, before vfiod's ${waitMs} ms detach timeout`);
    must(s.ms < s.deadlineMs, `Detach answered after ${s.ms} ms, beyond its ${s.deadlineMs} ms deadline`);
  });

  test("firmware-only L2: List still shows the device after the pending detach", () => {
    const { spare } = result().config.devices;
    const listed = bdfs(value("list l2fw after detach").devices);
    must(listed.includes(spare.bdf), `l2fw lists ${listed.join(", ") || "nothing"}, want ${spare.bdf} still there`);
  });

  describe("managed binding (vfiod --manage-binding, AttachRequest.managed), on L1's real kernel", () => {
    const refusal = (name: StepName, reason: string) => {
      const s = step(name);
      const f = s.failure;
      must(f !== undefined, `"${name}" was not refused: ${s.error ?? JSON.stringify(s.value)}`);
      must(f.code === status.FAILED_PRECONDITION || reason === "DEVICE_NOT_ALLOWED", `refused with ${status[f.code]}: ${f.details}`);
      must(f.reason === reason, `refused with reason ${f.reason}, want ${reason}: ${f.details}`);
      return f;
    };

    test("without --manage-binding, a managed Attach is BINDING_DISABLED and the NIC keeps its host driver", () => {
      refusal("managed attach without --manage-binding", "BINDING_DISABLED");
      const { managed } = result().config.devices;
      const state = value("device untouched after BINDING_DISABLED");
      must(state.driver === managed.hostDriver && state.override === "(null)", `changed: ${JSON.stringify(state)}`);
    });

    test("a managed Attach of the NIC while its interface is up is DEVICE_BUSY_ON_HOST, naming the interface", () => {
      const { managed } = result().config.devices;
      const f = refusal("managed attach while its interface is up", "DEVICE_BUSY_ON_HOST");
      must(/network interface \S+ is up/.test(f.details) && f.details.includes(managed.bdf), `the refusal does not name the interface: ${f.details}`);
    });

    test("a managed Attach of a device outside --allow-devices is refused before anything is written: its driver and override unchanged", () => {
      const f = step("managed attach outside --allow-devices").failure;
      must(f !== undefined && f.code === status.PERMISSION_DENIED && f.reason === "DEVICE_NOT_ALLOWED", `not DEVICE_NOT_ALLOWED: ${JSON.stringify(f)}`);
      const { before, after } = value("device outside --allow-devices untouched");
      must(before.driver !== null && after.driver === before.driver, `driver ${before.driver} -> ${after.driver}`);
      must(after.override === before.override, `driver_override ${before.override} -> ${after.override}`);
    });

    test("vfiod killed between the bind and the attach: the restarted vfiod puts the NIC back on its driver before it serves", () => {
      const { managed } = result().config.devices;
      const bound = value("managed attach to the hung VM: bound, not attached");
      must(bound.driver === "vfio-pci", `before the kill the NIC was on ${bound.driver}`);
      must(bound.stateFiles.includes(`${managed.bdf}.json`), `no state record before the kill: ${bound.stateFiles.join(", ")}`);
      must(value("vfiod killed mid-attach").signal === "SIGKILL", "vfiod was not killed by SIGKILL");
      const back = value("restarted vfiod put the device back");
      must(back.driver === managed.hostDriver, `after the restart the NIC is on ${back.driver}, want ${managed.hostDriver}`);
      must(back.interfaces.length > 0, "its network interface did not come back");
      must(back.stateFiles.length === 0, `records left: ${back.stateFiles.join(", ")}`);
    });

    test("a managed Attach binds the NIC from its host driver to vfio-pci, and the L2 guest sees it where vfiod says", () => {
      const { managed } = result().config.devices;
      const { device } = value("managed attach NIC");
      must(device.bdf === managed.bdf, `Attach returned ${device.bdf}, want ${managed.bdf}`);
      must(value("managed NIC on vfio-pci in L1").driver === "vfio-pci", "not on vfio-pci in L1 after the attach");
      const seen = value("L2 guest sees managed NIC");
      must(device.guestBdf === seen.guestBdf, `vfiod says ${device.guestBdf}; the guest printed "${seen.line}"`);
    });

    test("Detach hands the NIC back: L1's driver owns it again and its interface reappears; the guest saw it go", () => {
      const { managed } = result().config.devices;
      must(step("managed detach NIC").ok, `Detach failed: ${step("managed detach NIC").error}`);
      const back = value("L1 driver owns managed NIC again");
      must(back.driver === managed.hostDriver && back.interfaces.length > 0, `after Detach: ${JSON.stringify(back)}`);
      must(back.override === "(null)", `driver_override left as ${back.override}`);
      value("L2 guest lost managed NIC");
      const t = result().managedTimings;
      process.stdout.write(
        `managed binding timings: attach ${t.attachMs} ms, detach with restore ${t.detachMs} ms, ` +
          `back on ${managed.hostDriver} with its interface ${t.backOnHostDriverMs} ms, bind ${t.bindMs} ms, restore at restart ${t.repairRestoreMs} ms\n`,
      );
    });
  });

  test("vfiod drains and exits 0 on SIGTERM", () => {
    const s = step("vfiod stops");
    must(s.ok, `vfiod: ${s.error}`);
  });

  test("lab.sh passed: every step ran as planned", () => {
    const failed = (lab.result?.steps ?? []).filter((s) => !s.ok).map((s) => `${s.name}: ${s.error}`);
    must(failed.length === 0, `steps not as planned:\n${failed.join("\n")}`);
    must(lab.exitCode === 0, `lab.sh exited ${lab.exitCode}; its last lines:\n${lab.tail}`);
  });
});
