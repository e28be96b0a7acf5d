// Fuzzing Attach through real gRPC: 100,000 generated requests (arbitrary,
// unicode and binary strings, path tricks, BDF look-alikes with out-of-range
// fields, very long strings, whitespace and NULs, mixed with valid forms of fake
// vfio-bound devices) to one in-process vfiod whose inventory holds three Cloud
// Hypervisor doubles. Each outcome is checked against an oracle written from the
// contract, and everything that reached a double's vm.add-device must be exactly
// {path: "/sys/bus/pci/devices/<full lower-case BDF>"} (+ a valid id). At the
// end the server is still SERVING and a plain valid Attach works.
// Detach, List and raw protobuf bytes: grpc-fuzz-raw.test.ts. Inputs and oracles: fuzz-inputs.ts.
import fc from "fast-check";
import { outcomeOf, runPool, Tally, withoutStackTraces } from "../support/load";
import { waitFor } from "../support/wait";
import {
  attachIdArb,
  expectedAttach,
  FuzzLab,
  HANG_MS,
  IN_FLIGHT,
  pciArb,
  SEED,
  show,
  SYSFS_PREFIX,
  VMS,
} from "./fuzz-inputs";

const ATTACH_RUNS = Number(process.env.VFIOD_FUZZ_ATTACH_RUNS ?? 100_000);

let lab: FuzzLab;
beforeAll(async () => {
  lab = await FuzzLab.start();
});
afterAll(async () => lab?.close("vfiod Attach fuzz"));

test(`${ATTACH_RUNS} generated Attach requests: only canonical sysfs paths of vfio devices reach Cloud Hypervisor`, async () => {
  const started = performance.now();
  const inputs = fc.sample(
    fc.record({ vm: fc.constantFrom(...VMS.map((vm) => vm.name)), pci: pciArb, id: attachIdArb }),
    { seed: SEED, numRuns: ATTACH_RUNS },
  );
  const generatedMs = performance.now() - started;
  const tally = new Tally();
  const expectedKinds = new Tally();
  let succeeded = 0;

  const describeInput = (input: { vm: string; pci: string; id: string }) =>
    `Attach(${input.vm}, ${show(input.pci)}, ${show(input.id)})`;
  await withoutStackTraces(() => runPool(inputs, IN_FLIGHT, async ({ vm, pci, id }) => {
    const expected = expectedAttach(pci, id);
    expectedKinds.add(expected.kind);
    const { outcome, response } = await outcomeOf(lab.server.client.attach({ vm, pci, id }));
    tally.add(outcome.key);
    const where = `Attach(${vm}, pci ${show(pci)}, id ${show(id)})`;
    lab.checkRefusal(where, outcome);
    if (expected.kind === "invalid") {
      if (outcome.key !== "INVALID_ARGUMENT/INVALID_ARGUMENT") {
        lab.problem(`${where}: expected INVALID_ARGUMENT, got ${outcome.key}`);
      }
      return;
    }
    if (expected.kind === "refused") {
      if (outcome.key !== expected.key) lab.problem(`${where}: expected ${expected.key}, got ${outcome.key}`);
      return;
    }
    // A valid request for a vfio-bound device: attached, or refused for what another request holds.
    if (outcome.key === "FAILED_PRECONDITION/DEVICE_IN_USE") {
      if (!VMS.some((other) => other.name !== vm && outcome.message.includes(other.name))) {
        lab.problem(`${where}: DEVICE_IN_USE names no other VM: ${outcome.message}`);
      }
      return;
    }
    if (outcome.key === "ALREADY_EXISTS/ID_IN_USE" || outcome.key === "ALREADY_EXISTS/DEVICE_ALREADY_ATTACHED") return;
    if (outcome.key !== "OK") {
      lab.problem(`${where}: a valid request for ${expected.bdf} got ${outcome.key}: ${outcome.message}`);
      return;
    }
    succeeded += 1;
    const device = response?.device;
    const idAsked = id === "" ? /^_vfio\d+$/.test(device?.id ?? "") : device?.id === id;
    if (device?.bdf !== expected.bdf || device.path !== SYSFS_PREFIX + expected.bdf || !idAsked) {
      lab.problem(`${where}: answered ${JSON.stringify(device)}, expected bdf ${expected.bdf}`);
      return;
    }
    lab.attachedIds.add(device.id);
    // Free the device again so later inputs can reach the hypervisor too.
    const detached = await outcomeOf(lab.server.client.detach({ vm, id: device.id }));
    tally.add(`(cleanup Detach) ${detached.outcome.key}`);
    // A concurrent idempotent Attach of the same id and device may have detached it first.
    if (detached.outcome.key !== "OK" && detached.outcome.key !== "NOT_FOUND/DEVICE_NOT_ATTACHED") {
      lab.problem(`cleanup Detach(${vm}, ${device.id}): ${detached.outcome.key} ${detached.outcome.message}`);
    }
  }, { hangMs: HANG_MS, describe: describeInput }));

  const adds = lab.requestsTo("vm.add-device");
  lab.checkHypervisorRequests();
  const elapsed = (performance.now() - started) / 1000;
  lab.figures.push(
    `Attach: ${inputs.length} generated in ${(generatedMs / 1000).toFixed(1)} s, sent in ${elapsed.toFixed(1)} s ` +
      `(${Math.round(inputs.length / elapsed)}/s, ${IN_FLIGHT} in flight); oracle: ${expectedKinds}`,
    `Attach: ${adds.length} reached vm.add-device, ${succeeded} answered OK; outcomes: ${tally}`,
  );

  expect(lab.problems).toEqual([]);
  // Otherwise the fuzz proves nothing about what reaches the hypervisor.
  expect(adds.length).toBeGreaterThan(100);
  expect(adds.length).toBeLessThanOrEqual(succeeded);
  expect(expectedKinds.get("invalid")).toBeGreaterThan(ATTACH_RUNS / 2);
  // Every device was detached again.
  await waitFor(() => lab.allDetached(), "every fuzz attach detached", 10_000);
  // Generous for a loaded 2-core machine; a hang fails much sooner (HANG_MS per call).
}, 300_000);

test("afterwards: only canonical paths and attached ids reached the hypervisor; health SERVING; a plain Attach works", async () => {
  await lab.finalChecks();
});
