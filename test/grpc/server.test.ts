// The gRPC surface itself: health, reflection (what grpcurl needs), and the one
// error mapping (ErrorInfo detail; nothing internal leaks).
import * as grpc from "@grpc/grpc-js";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import type { Backend } from "../../src/backends/backend";
import { BackendRegistry } from "../../src/backends/registry";
import { VfiodError } from "../../src/errors";
import { errorInfo } from "../../src/grpc/client";
import { bufCurlCall } from "../support/buf-curl";
import { buildFakeSysfs, type FakeSysfs } from "../support/fake-sysfs";
import { checkHealth, reflect, reflectFiles } from "../support/grpc-clients";
import { capturingLogger } from "../support/log-capture";
import { failure, startTestServer, type TestServer } from "../support/test-server";

let dir: string;
let sysfs: FakeSysfs;
let server: TestServer;

/** A backend that fails the way a bug would, and one that fails properly. */
const faulty: Backend = {
  attach: async () => {
    throw new TypeError("Cannot read properties of undefined (reading 'config') at /opt/vfiod/secret.js:1");
  },
  detach: async () => {
    throw new VfiodError("DETACH_PENDING", "guest has not released device gpu0", { meta: { vm: "odd", id: "gpu0" } });
  },
  list: async () => [],
  state: async () => "Running",
  queues: () => [],
};

beforeAll(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "vfiod-srv-"));
  sysfs = buildFakeSysfs([{ bdf: "0000:01:00.0", driver: "vfio-pci", group: 1 }]);
  const inventoryFile = path.join(dir, "inventory.json");
  fs.writeFileSync(inventoryFile, JSON.stringify({ vms: [{ name: "odd", hypervisor: "faulty", socket: "/nonexistent" }] }));
  server = await startTestServer({
    inventoryFile,
    sysfsRoot: sysfs.root,
    backends: new BackendRegistry().register("faulty", faulty),
  });
});

afterAll(async () => {
  await server.stop();
  sysfs.cleanup();
  fs.rmSync(dir, { recursive: true, force: true });
});

test("health answers SERVING for the server and for vfiod.v1.DeviceService", async () => {
  expect(await checkHealth(server.address, "")).toBe("SERVING");
  expect(await checkHealth(server.address, "vfiod.v1.DeviceService")).toBe("SERVING");
});

describe.each(["v1", "v1alpha"] as const)("server reflection %s", (version) => {
  test("lists DeviceService, Health and reflection", async () => {
    const response = await reflect(server.address, version, { list_services: "*" });
    const names = (response.list_services_response as { service: { name: string }[] }).service.map((s) => s.name);
    expect(names).toEqual(expect.arrayContaining(["vfiod.v1.DeviceService", "grpc.health.v1.Health"]));
  });

  test("describes DeviceService with every file it imports, so clients can resolve all types", async () => {
    for (const symbol of ["vfiod.v1.DeviceService", "google.rpc.ErrorInfo", "google.rpc.Status"]) {
      const files = await reflectFiles(server.address, version, { file_containing_symbol: symbol });
      const names = new Set(files.map((f) => f.name));
      for (const file of files) for (const dependency of file.dependency) expect(names).toContain(dependency);
      if (symbol === "vfiod.v1.DeviceService") {
        const device = files.find((f) => f.name === "vfiod/v1/device.proto");
        expect(device?.service[0]?.method.map((m) => m.name)).toEqual(["Attach", "Detach", "List", "Watch"]);
      }
    }
  });
});

test("buf curl (a reflection-only client, like grpcurl) calls List with no proto files", async () => {
  const { exitCode, stdout, stderr } = await bufCurlCall(server.address, "vfiod.v1.DeviceService/List", { vm: "odd" });
  expect({ exitCode, stderr }).toEqual({ exitCode: 0, stderr: "" });
  expect(JSON.parse(stdout)).toEqual({});
});

test("an error that is not a VfiodError is INTERNAL 'internal error' with nothing internal in it", async () => {
  const err = await failure(server.client.attach({ vm: "odd", pci: "01:00.0", id: "" }));
  expect(err.code).toBe(grpc.status.INTERNAL);
  expect(err.message).toBe("internal error");
  expect(err.reason).toBeUndefined();
});

test("a VfiodError carries google.rpc.Status with ErrorInfo (domain vfiod, reason, metadata)", async () => {
  let caught: unknown;
  await server.client.detach({ vm: "odd", id: "gpu0" }).catch((e: unknown) => (caught = e));
  expect((caught as grpc.ServiceError).code).toBe(grpc.status.DEADLINE_EXCEEDED);
  expect(errorInfo(caught)).toMatchObject({ domain: "vfiod", reason: "DETACH_PENDING", metadata: { vm: "odd", id: "gpu0" } });
});

test("malformed request bytes are refused, and the server keeps serving", async () => {
  const client = new grpc.Client(server.address, grpc.credentials.createInsecure());
  const garbage = Buffer.from([0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f]);
  const code = await new Promise<number>((resolve) =>
    client.makeUnaryRequest(
      "/vfiod.v1.DeviceService/List",
      (b: Buffer) => b,
      (b: Buffer) => b,
      garbage,
      (err) => resolve(err?.code ?? grpc.status.OK),
    ),
  );
  client.close();
  expect([grpc.status.INTERNAL, grpc.status.INVALID_ARGUMENT]).toContain(code);
  expect(await checkHealth(server.address, "")).toBe("SERVING");
});

test("a bug is logged once at error with its stack, the refusal beside it at info without one (issue 8 item 16)", async () => {
  const { log, lines } = capturingLogger("info");
  const logged = await startTestServer({
    inventoryFile: path.join(dir, "inventory.json"),
    sysfsRoot: sysfs.root,
    backends: new BackendRegistry().register("faulty", faulty),
    log,
  });
  try {
    const bug = new grpc.Metadata();
    bug.set("x-request-id", "bug-1");
    expect((await failure(logged.client.attach({ vm: "odd", pci: "01:00.0", id: "" }, { metadata: bug }))).code).toBe(grpc.status.INTERNAL);
    const refusal = new grpc.Metadata();
    refusal.set("x-request-id", "refusal-1");
    expect((await failure(logged.client.detach({ vm: "odd", id: "gpu0" }, { metadata: refusal }))).reason).toBe("DETACH_PENDING");
  } finally {
    await logged.stop();
  }
  const bugLines = lines.filter((l) => l.requestId === "bug-1");
  expect(bugLines).toEqual([
    expect.objectContaining({ level: 50, msg: "Attach failed: internal error", method: "Attach", vmRef: "odd", vm: "odd" }),
  ]);
  const err = bugLines[0]!.err as { type: string; message: string; stack: string };
  expect(err.type).toBe("TypeError");
  expect(err.stack).toMatch(/^TypeError: Cannot read properties of undefined[^\n]*\n\s+at /);
  const refusalLines = lines.filter((l) => l.requestId === "refusal-1");
  expect(refusalLines).toEqual([
    expect.objectContaining({ level: 30, msg: "Detach refused", reason: "DETACH_PENDING", code: "DEADLINE_EXCEEDED", message: "guest has not released device gpu0" }),
  ]);
  expect(JSON.stringify(refusalLines)).not.toContain("stack");
});
