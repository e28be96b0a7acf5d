// What a reflection-only client (grpcurl, buf curl) sees of vfiod: every service it
// lists must load from the descriptors reflection serves, and be callable with no
// proto files. A real in-process vfiod, a fake sysfs and a Cloud Hypervisor double.
import { create, createFileRegistry } from "@bufbuild/protobuf";
import {
  FieldDescriptorProto_Label,
  FileDescriptorSetSchema,
  type DescriptorProto,
  type FileDescriptorProto,
} from "@bufbuild/protobuf/wkt";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { bufCurl, bufCurlCall, parseBufCurlError } from "../support/buf-curl";
import { ChDouble } from "../support/ch-double";
import { buildFakeSysfs, type FakeSysfs } from "../support/fake-sysfs";
import { reflect, reflectFiles } from "../support/grpc-clients";
import { startTestServer, type TestServer } from "../support/test-server";

const HEALTH = "grpc.health.v1.Health";
const DEVICE_SERVICE = "vfiod.v1.DeviceService";

let dir: string;
let sysfs: FakeSysfs;
let ch: ChDouble;
let server: TestServer;

/** Requests that would change the VM's devices. */
const mutations = () => ch.requests.filter((r) => r.endpoint === "vm.add-device" || r.endpoint === "vm.remove-device").length;

beforeAll(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "vfiod-refl-"));
  sysfs = buildFakeSysfs([{ bdf: "0000:01:00.0", driver: "vfio-pci", group: 1 }]);
  const socket = path.join(dir, "vm1.sock");
  ch = await ChDouble.start(socket);
  ch.setState("Running");
  const inventoryFile = path.join(dir, "inventory.json");
  fs.writeFileSync(inventoryFile, JSON.stringify({ vms: [{ name: "vm1", hypervisor: "cloud-hypervisor", socket }] }));
  server = await startTestServer({ inventoryFile, sysfsRoot: sysfs.root });
});

afterAll(async () => {
  await server.stop();
  await ch.close();
  sysfs.cleanup();
  fs.rmSync(dir, { recursive: true, force: true });
});

/** Every file reflection serves for the services it lists, with each import fetched by name. */
async function everyServedFile(version: "v1" | "v1alpha"): Promise<Map<string, FileDescriptorProto>> {
  const listed = await reflect(server.address, version, { list_services: "*" });
  const services = (listed.list_services_response as { service: { name: string }[] }).service.map((s) => s.name);
  const files = new Map<string, FileDescriptorProto>();
  const add = (batch: FileDescriptorProto[]) => batch.forEach((file) => files.set(file.name, file));
  for (const service of services) add(await reflectFiles(server.address, version, { file_containing_symbol: service }));
  const missing = () => [...files.values()].flatMap((file) => file.dependency).filter((name) => !files.has(name));
  for (let names = missing(); names.length > 0; names = missing()) {
    for (const name of names) add(await reflectFiles(server.address, version, { file_by_filename: name }));
  }
  return files;
}

/**
 * Messages with an explicit map_entry option that is not a map field's own entry type,
 * the way protoc synthesizes it (nested `<FieldName>Entry` of a repeated field): Go's
 * protodesc (buf, grpcurl) refuses those ("map_entry should not be set explicitly");
 * protobuf-es's createFileRegistry does not check it, so this does.
 */
function strayMapEntries(file: FileDescriptorProto): string[] {
  const stray: string[] = [];
  const pascal = (name: string) => name.replace(/(?:^|_)([a-z])/g, (_, c: string) => c.toUpperCase());
  const visit = (message: DescriptorProto, scope: string, parent: DescriptorProto | undefined) => {
    const fullName = `${scope}.${message.name}`;
    if (message.options?.mapEntry === true) {
      const field = parent?.field.find((f) => f.typeName === `.${fullName}` || f.typeName === message.name);
      const proper =
        field !== undefined &&
        field.label === FieldDescriptorProto_Label.REPEATED &&
        field.typeName === `.${fullName}` &&
        message.name === `${pascal(field.name)}Entry`;
      if (!proper) stray.push(fullName);
    }
    message.nestedType.forEach((nested) => visit(nested, fullName, message));
  };
  file.messageType.forEach((message) => visit(message, file.package, undefined));
  return stray;
}

describe("buf curl lists through reflection alone", () => {
  test("--list-services names grpc.health.v1.Health and vfiod.v1.DeviceService", async () => {
    const { exitCode, stdout, stderr } = await bufCurl(["--list-services", `http://${server.address}`]);
    expect({ exitCode, stderr }).toEqual({ exitCode: 0, stderr: "" });
    expect(stdout.trim().split("\n")).toEqual(expect.arrayContaining([HEALTH, DEVICE_SERVICE]));
  });

  test.each([
    [HEALTH, ["Check", "List", "Watch"]],
    [DEVICE_SERVICE, ["Attach", "Detach", "List", "Watch"]],
  ])("--list-methods resolves %s and lists %j", async (service, methods) => {
    const { exitCode, stdout, stderr } = await bufCurl(["--list-methods", `http://${server.address}`]);
    expect({ exitCode, stderr }).toEqual({ exitCode: 0, stderr: "" });
    const listed = stdout
      .trim()
      .split("\n")
      .filter((line) => line.startsWith(`${service}/`))
      .map((line) => line.slice(service.length + 1));
    expect(listed.sort()).toEqual(methods);
  });
});

describe.each(["v1", "v1alpha"] as const)("reflection %s descriptors", (version) => {
  test("grpc.health.v1.Health comes in grpc/health/v1/health.proto, its map field a proper map entry", async () => {
    const files = await reflectFiles(server.address, version, { file_containing_symbol: HEALTH });
    const health = files.find((file) => file.service.some((service) => `${file.package}.${service.name}` === HEALTH));
    expect(health?.name).toBe("grpc/health/v1/health.proto");
    expect(strayMapEntries(health!)).toEqual([]);

    const registry = createFileRegistry(create(FileDescriptorSetSchema, { file: files }));
    expect(registry.getService(HEALTH)?.methods.map((m) => m.name)).toEqual(["Check", "Watch", "List"]);
    const statuses = registry.getMessage("grpc.health.v1.HealthListResponse")?.fields.find((f) => f.name === "statuses");
    expect(statuses?.fieldKind).toBe("map");
  });

  test("every served file builds one registry (what buf and grpcurl do first) holding every listed service", async () => {
    const files = await everyServedFile(version);
    expect([...files.keys()]).toEqual(expect.arrayContaining(["grpc/health/v1/health.proto", "vfiod/v1/device.proto"]));
    for (const file of files.values()) expect({ file: file.name, stray: strayMapEntries(file) }).toEqual({ file: file.name, stray: [] });

    // A FileDescriptorSet lists each file after its imports, as protoc writes one.
    const ordered: FileDescriptorProto[] = [];
    const visit = (file: FileDescriptorProto | undefined) => {
      if (file === undefined || ordered.includes(file)) return;
      file.dependency.forEach((name) => visit(files.get(name)));
      ordered.push(file);
    };
    files.forEach(visit);
    const registry = createFileRegistry(create(FileDescriptorSetSchema, { file: ordered }));
    expect(registry.getService(HEALTH)).toBeDefined();
    expect(registry.getService(DEVICE_SERVICE)?.methods.map((m) => m.name)).toEqual(["Attach", "Detach", "List", "Watch"]);
  });
});

describe("buf curl calls through reflection alone", () => {
  test.each(["", DEVICE_SERVICE])("grpc.health.v1.Health/Check {service: %j} is SERVING", async (service) => {
    const { exitCode, stdout, stderr } = await bufCurlCall(server.address, `${HEALTH}/Check`, { service });
    expect({ exitCode, stderr }).toEqual({ exitCode: 0, stderr: "" });
    expect(JSON.parse(stdout)).toEqual({ status: "SERVING" });
  });

  test("DeviceService/List on a running Cloud Hypervisor VM answers OK with its devices", async () => {
    const { device } = await server.client.attach({ vm: "vm1", pci: "01:00.0", id: "gpu0" });
    const { exitCode, stdout, stderr } = await bufCurlCall(server.address, `${DEVICE_SERVICE}/List`, { vm: "vm1" });
    expect({ exitCode, stderr }).toEqual({ exitCode: 0, stderr: "" });
    expect(JSON.parse(stdout)).toEqual({
      devices: [{ id: "gpu0", bdf: "0000:01:00.0", path: "/sys/bus/pci/devices/0000:01:00.0", guestBdf: device?.guestBdf }],
    });
    expect(device?.guestBdf).toMatch(/^0000:00:[0-1][0-9a-f]\.0$/);
  });

  test.each([
    ["Attach", { vm: "vm1", pci: "" }, "invalid_argument", "INVALID_ARGUMENT", 3],
    ["Attach", { vm: "no-such-vm", pci: "01:00.0", id: "gpu1" }, "not_found", "VM_NOT_FOUND", 5],
    ["Detach", { vm: "", id: "gpu0" }, "invalid_argument", "INVALID_ARGUMENT", 3],
    ["Detach", { vm: "no-such-vm", id: "gpu0" }, "not_found", "VM_NOT_FOUND", 5],
    ["Detach", { vm: "vm1", id: "never-attached" }, "not_found", "DEVICE_NOT_ATTACHED", 5],
  ])("DeviceService/%s %j is refused %s, with ErrorInfo reason %s in buf curl's error details",
    async (method, request, code, reason, grpcCode) => {
      const before = mutations();
      const { exitCode, stdout, stderr } = await bufCurlCall(server.address, `${DEVICE_SERVICE}/${method}`, request);
      // buf curl exits with the gRPC code shifted three bits left (buf curl --help).
      expect({ exitCode, stdout }).toEqual({ exitCode: grpcCode << 3, stdout: "" });
      const printed = parseBufCurlError(stderr);
      expect(printed.code).toBe(code);
      expect(printed.errorInfos).toEqual([expect.objectContaining({ domain: "vfiod", reason })]);
      expect(mutations()).toBe(before);
    });
});
