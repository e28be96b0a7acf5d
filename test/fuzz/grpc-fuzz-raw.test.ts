// Fuzzing Detach and List through real gRPC (10,000 generated ids and 10,000 VM
// refs, checked against the contract's rules), and malformed protobuf bytes to
// each DeviceService RPC over a raw grpc-js client (truncated varints, wrong wire
// types, huge length prefixes, invalid UTF-8, bad tags, mutated valid requests):
// each gets a status, never a crash or a hang, and the server is still SERVING.
// Attach: grpc-fuzz.test.ts. Inputs and oracles: fuzz-inputs.ts.
import * as grpc from "@grpc/grpc-js";
import { fromBinary } from "@bufbuild/protobuf";
import fc from "fast-check";
import {
  AttachRequestSchema,
  AttachResponseSchema,
  DetachRequestSchema,
  ListRequestSchema,
} from "../../gen/vfiod/v1/device_pb";
import { errorReason } from "../../src/grpc/client";
import { codeName, outcomeOf, runPool, Tally, withoutStackTraces } from "../support/load";
import {
  detachIdArb,
  existingIdValid,
  expectedVm,
  FuzzLab,
  HANG_MS,
  IN_FLIGHT,
  rawBytesArb,
  rawCall,
  SEED,
  show,
  vmRefArb,
  VMS,
} from "./fuzz-inputs";

const DETACH_RUNS = 10_000;
const LIST_RUNS = 10_000;
const RAW_RUNS_PER_RPC = 3_000;

/** vm, then id, then the VM's resolution; nothing is attached, so a valid id is DEVICE_NOT_ATTACHED. */
function expectedDetach(vm: string, id: string): string {
  if (vm.trim() === "" || !existingIdValid(id)) return "INVALID_ARGUMENT/INVALID_ARGUMENT";
  const resolved = expectedVm(vm);
  return "key" in resolved ? resolved.key : "NOT_FOUND/DEVICE_NOT_ATTACHED";
}

let lab: FuzzLab;
beforeAll(async () => {
  lab = await FuzzLab.start();
});
afterAll(async () => lab?.close("vfiod Detach/List/raw fuzz"));

test(`${DETACH_RUNS} generated Detach requests: nothing is removed that is not attached`, async () => {
  const inputs = fc.sample(
    fc.record({
      vm: fc.oneof({ weight: 9, arbitrary: fc.constantFrom(...VMS.map((vm) => vm.name)) }, { weight: 1, arbitrary: vmRefArb }),
      id: detachIdArb,
    }),
    { seed: SEED + 1, numRuns: DETACH_RUNS },
  );
  const removesBefore = lab.requestsTo("vm.remove-device").length;
  const tally = new Tally();
  const started = performance.now();
  const describeInput = ({ vm, id }: { vm: string; id: string }) => `Detach(${show(vm)}, ${show(id)})`;
  await withoutStackTraces(() => runPool(inputs, IN_FLIGHT, async ({ vm, id }) => {
    const { outcome } = await outcomeOf(lab.server.client.detach({ vm, id }));
    tally.add(outcome.key);
    const where = `Detach(vm ${show(vm)}, id ${show(id)})`;
    lab.checkRefusal(where, outcome);
    const expected = expectedDetach(vm, id);
    if (outcome.key !== expected) lab.problem(`${where}: expected ${expected}, got ${outcome.key} (${show(outcome.message)})`);
  }, { hangMs: HANG_MS, describe: describeInput }));
  const elapsed = (performance.now() - started) / 1000;
  lab.figures.push(`Detach: ${inputs.length} in ${elapsed.toFixed(1)} s; outcomes: ${tally}`);
  expect(lab.problems).toEqual([]);
  // Nothing was attached, so nothing may have been asked to go.
  expect(lab.requestsTo("vm.remove-device").length).toBe(removesBefore);
  expect(tally.get("NOT_FOUND/DEVICE_NOT_ATTACHED")).toBeGreaterThan(100);
}, 120_000);

test(`${LIST_RUNS} generated List VM refs resolve as the contract says`, async () => {
  const inputs = fc.sample(vmRefArb, { seed: SEED + 2, numRuns: LIST_RUNS });
  const tally = new Tally();
  const started = performance.now();
  await withoutStackTraces(() => runPool(inputs, IN_FLIGHT, async (vm) => {
    const { outcome, response } = await outcomeOf(lab.server.client.list({ vm }));
    tally.add(outcome.key);
    const where = `List(vm ${show(vm)})`;
    lab.checkRefusal(where, outcome);
    const expected = expectedVm(vm);
    if ("key" in expected) {
      if (outcome.key !== expected.key) lab.problem(`${where}: expected ${expected.key}, got ${outcome.key}`);
      const unlisted = VMS.filter((m) => m.id.startsWith(vm) && !outcome.message.includes(m.name));
      if (expected.key.endsWith("VM_AMBIGUOUS") && unlisted.length > 0) {
        lab.problem(`${where}: VM_AMBIGUOUS does not list the matches: ${outcome.message}`);
      }
    } else if (outcome.key !== "OK" || response?.devices.length !== 0) {
      // Every valid List succeeds: vfiod keeps within CH's 10 connections per socket.
      lab.problem(`${where}: expected the empty List of ${expected.vm}, got ${outcome.key}`);
    }
  }, { hangMs: HANG_MS, describe: (vm) => `List(${show(vm)})` }));
  const elapsed = (performance.now() - started) / 1000;
  lab.figures.push(`List: ${inputs.length} in ${elapsed.toFixed(1)} s; outcomes: ${tally}`);
  expect(lab.problems).toEqual([]);
  expect(tally.get("OK")).toBeGreaterThan(100);
}, 120_000);

describe("malformed protobuf bytes", () => {
  const rpcs = [
    { method: "Attach", schema: AttachRequestSchema, valid: { vm: "fuzz-a", pci: "0000:3b:00.0", id: "raw0" } },
    { method: "Detach", schema: DetachRequestSchema, valid: { vm: "fuzz-a", id: "raw0" } },
    { method: "List", schema: ListRequestSchema, valid: { vm: "4f1c2" } },
  ] as const;

  const title = `${RAW_RUNS_PER_RPC} random byte strings to /vfiod.v1.DeviceService/$method get a status, never a crash or hang`;
  test.each(rpcs)(title, async ({ method, schema, valid }) => {
    const client = new grpc.Client(lab.server.address, grpc.credentials.createInsecure());
    try {
      const inputs = fc.sample(rawBytesArb(schema, valid), { seed: SEED + 3 + method.length, numRuns: RAW_RUNS_PER_RPC });
      const tally = new Tally();
      let decodable = 0;
      const describeInput = (bytes: Uint8Array) => `${method} bytes ${Buffer.from(bytes).toString("hex").slice(0, 160)}`;
      await withoutStackTraces(() => runPool(inputs, IN_FLIGHT, async (bytes) => {
        let decoded = true;
        try {
          fromBinary(schema, bytes);
        } catch {
          decoded = false;
        }
        if (decoded) decodable += 1;
        const { err, response } = await rawCall(client, `/vfiod.v1.DeviceService/${method}`, Buffer.from(bytes));
        const where = `${method} bytes ${Buffer.from(bytes).toString("hex").slice(0, 80)}`;
        if (err === null) {
          tally.add("OK");
          if (method === "Attach" && response !== undefined) {
            const id = fromBinary(AttachResponseSchema, response).device?.id;
            if (id !== undefined) lab.attachedIds.add(id);
          }
          return;
        }
        const reason = errorReason(err);
        const key = `${codeName(err.code)}/${reason ?? "-"}`;
        tally.add(key);
        if (reason === undefined) {
          // Only grpc-js's own refusal of bytes that do not decode comes without an ErrorInfo.
          if (err.code !== grpc.status.INTERNAL || !err.details.startsWith("Error deserializing request") || decoded) {
            lab.problem(`${where}: ${key} "${err.details}" (decodes: ${decoded})`);
          }
        } else {
          lab.checkRefusal(where, { key, code: err.code, reason, message: err.details });
        }
      }, { hangMs: HANG_MS, describe: describeInput }));
      // One message past grpc-js's 4 MiB receive limit.
      const huge = await rawCall(client, `/vfiod.v1.DeviceService/${method}`, Buffer.alloc(5 * 1024 * 1024, 0x0a));
      tally.add(`(5 MiB) ${huge.err === null ? "OK" : codeName(huge.err.code)}`);
      lab.figures.push(`raw ${method}: ${inputs.length} byte strings (${decodable} decodable); outcomes: ${tally}`);
      expect(lab.problems).toEqual([]);
      expect(huge.err?.code).toBe(grpc.status.RESOURCE_EXHAUSTED);
      expect(tally.get("INTERNAL/-")).toBeGreaterThan(100);
    } finally {
      client.close();
    }
  }, 120_000);
});

test("afterwards: only attached ids were removed, health SERVING, and a plain Attach works", async () => {
  await lab.finalChecks();
});
