// Proves the Cloud Hypervisor double is faithful: its routes and bodies against the
// upstream OpenAPI file, its bytes and behaviour against cloud-hypervisor.md §1–§5.
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import yaml from "js-yaml";
import { CH_DOUBLE_ROUTES, ChDouble, type ChDoubleOptions } from "./ch-double";
import { buildFakeSysfs } from "./fake-sysfs";
import { sharedFile } from "./shared";

interface RawResponse {
  statusLine: string;
  status: number;
  headers: Array<[string, string]>;
  body: string;
}

/** Writes raw bytes and reads `count` responses, or what came before the server closed. */
function exchange(
  socketPath: string,
  bytes: string,
  count: number,
): Promise<{ responses: RawResponse[]; closed: boolean }> {
  return new Promise((resolve, reject) => {
    const socket = net.connect(socketPath);
    const responses: RawResponse[] = [];
    let buffer = "";
    const done = (closed: boolean) => {
      clearTimeout(guard);
      socket.destroy();
      resolve({ responses, closed });
    };
    const guard = setTimeout(() => done(false), 3000);
    socket.on("error", reject);
    socket.on("close", () => done(true));
    socket.on("data", (chunk: Buffer) => {
      buffer += chunk.toString("latin1");
      for (;;) {
        const end = buffer.indexOf("\r\n\r\n");
        if (end < 0) return;
        const [statusLine = "", ...lines] = buffer.slice(0, end).split("\r\n");
        const headers = lines.map((line): [string, string] => [
          line.slice(0, line.indexOf(":")),
          line.slice(line.indexOf(":") + 2),
        ]);
        const length = Number(headers.find(([name]) => name === "Content-Length")?.[1] ?? 0);
        if (buffer.length < end + 4 + length) return;
        responses.push({
          statusLine,
          status: Number(statusLine.split(" ")[1]),
          headers,
          body: buffer.slice(end + 4, end + 4 + length),
        });
        buffer = buffer.slice(end + 4 + length);
        if (responses.length === count) done(false);
      }
    });
    socket.write(bytes);
  });
}

function requestBytes(method: string, endpoint: string, body?: unknown): string {
  const text = body === undefined ? "" : typeof body === "string" ? body : JSON.stringify(body);
  const length = body === undefined ? "" : `Content-Length: ${Buffer.byteLength(text)}\r\n`;
  return `${method} /api/v1/${endpoint} HTTP/1.1\r\nHost: localhost\r\n${length}\r\n${text}`;
}

async function call(
  socketPath: string,
  method: string,
  endpoint: string,
  body?: unknown,
): Promise<{ status: number; body: unknown }> {
  const [response] = (await exchange(socketPath, requestBytes(method, endpoint, body), 1)).responses;
  if (response === undefined) throw new Error(`no response to ${method} ${endpoint}`);
  return { status: response.status, body: response.body === "" ? undefined : JSON.parse(response.body) };
}

const GPU = "/sys/bus/pci/devices/0000:01:00.0";
const NIC = "/sys/bus/pci/devices/0000:02:00.0";

let dir: string;
let socketPath: string;
let double: ChDouble | undefined;

async function start(options: ChDoubleOptions = {}): Promise<ChDouble> {
  double = await ChDouble.start(socketPath, options);
  return double;
}

beforeEach(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "vfiod-"));
  socketPath = path.join(dir, "api.sock");
});

afterEach(async () => {
  await double?.close();
  double = undefined;
  fs.rmSync(dir, { recursive: true, force: true });
});

// ---- the OpenAPI file ----

interface Schema {
  $ref?: string;
  type?: string;
  enum?: unknown[];
  required?: string[];
  properties?: Record<string, Schema>;
  additionalProperties?: Schema | boolean;
  items?: Schema;
}

interface Spec {
  paths: Record<string, Record<string, { responses: Record<string, unknown> }>>;
  components: { schemas: Record<string, Schema> };
}

/** Where `value` breaks `schema` (required fields, types, enums; nested through $ref). */
function schemaErrors(spec: Spec, schema: Schema, value: unknown, at = "$"): string[] {
  if (schema.$ref !== undefined) {
    const target = spec.components.schemas[schema.$ref.replace("#/components/schemas/", "")];
    return target === undefined ? [`${at}: unknown ${schema.$ref}`] : schemaErrors(spec, target, value, at);
  }
  const typeOk: Record<string, (v: unknown) => boolean> = {
    object: (v) => typeof v === "object" && v !== null && !Array.isArray(v),
    array: Array.isArray,
    string: (v) => typeof v === "string",
    integer: Number.isInteger,
    number: (v) => typeof v === "number",
    boolean: (v) => typeof v === "boolean",
  };
  if (schema.type !== undefined && !typeOk[schema.type]?.(value))
    return [`${at}: ${JSON.stringify(value)} is not ${schema.type}`];
  if (schema.enum !== undefined && !schema.enum.includes(value)) return [`${at}: ${JSON.stringify(value)} not in enum`];
  const errors: string[] = [];
  if (Array.isArray(value) && schema.items !== undefined) {
    value.forEach((item, i) => errors.push(...schemaErrors(spec, schema.items as Schema, item, `${at}[${i}]`)));
  }
  if (typeof value === "object" && value !== null && !Array.isArray(value)) {
    const record = value as Record<string, unknown>;
    for (const name of schema.required ?? []) if (!(name in record)) errors.push(`${at}.${name}: required`);
    for (const [name, field] of Object.entries(record)) {
      const fieldSchema =
        schema.properties?.[name] ??
        (typeof schema.additionalProperties === "object" ? schema.additionalProperties : undefined);
      if (fieldSchema !== undefined) errors.push(...schemaErrors(spec, fieldSchema, field, `${at}.${name}`));
    }
  }
  return errors;
}

const specFile = sharedFile("reference/cloud-hypervisor.yaml");
const describeSpec = specFile === undefined ? describe.skip : describe;

describeSpec("the double against cloud-hypervisor.yaml", () => {
  const spec = (specFile === undefined ? undefined : yaml.load(fs.readFileSync(specFile, "utf8"))) as Spec;
  const schema = (name: string): Schema => ({ $ref: `#/components/schemas/${name}` });
  const declared = (endpoint: string, method: string, status: number) =>
    Object.keys(spec.paths[`/${endpoint}`]?.[method.toLowerCase()]?.responses ?? {})
      .map(Number)
      .includes(status);

  test("every route and method the double serves is in the spec", () => {
    for (const [endpoint, method] of Object.entries(CH_DOUBLE_ROUTES)) {
      expect(spec.paths[`/${endpoint}`]?.[method.toLowerCase()]).toBeDefined();
    }
  });

  test.each(["v52", "v53", "main"] as const)(
    "%s: vm.info, add-device and ping bodies have the schema's fields",
    async (profile) => {
      const ch = await start({ profile });
      ch.setState("Running");
      ch.addDisk();
      const added = await call(socketPath, "PUT", "vm.add-device", { path: GPU, id: "gpu0" });
      expect(schemaErrors(spec, schema("PciDeviceInfo"), added.body)).toEqual([]);
      const info = await call(socketPath, "GET", "vm.info");
      // ≤v52 sends unset optional fields as null where the spec means "absent".
      const body =
        profile === "v52" ? JSON.parse(JSON.stringify(info.body, (_k, v: unknown) => v ?? undefined)) : info.body;
      expect(schemaErrors(spec, schema("VmInfo"), body)).toEqual([]);
      expect((body as { config: { devices: unknown[] } }).config.devices).toHaveLength(1);
      const ping = await call(socketPath, "GET", "vmm.ping");
      expect(schemaErrors(spec, schema("VmmPingResponse"), ping.body)).toEqual([]);
    },
  );

  test("main: the statuses the double answers with are the ones the spec declares", async () => {
    const ch = await start({ profile: "main" });
    const seen: Array<[string, string, number]> = [];
    const record = async (method: string, endpoint: string, body?: unknown) =>
      seen.push([endpoint, method, (await call(socketPath, method, endpoint, body)).status]);
    await record("GET", "vm.info"); // 404: no VM
    ch.setState("Created");
    await record("PUT", "vm.add-device", { path: GPU, id: "cold" }); // 204: config only
    ch.setState("Running");
    await record("GET", "vmm.ping");
    await record("GET", "vm.info");
    await record("PUT", "vm.add-device", { path: NIC, id: "gpu0" }); // 200
    await record("PUT", "vm.add-device", { path: NIC, id: "other" }); // 409: duplicate path
    await record("PUT", "vm.add-device", { path: "/sys/bus/pci/devices/0000:03:00.0", id: "__x" }); // 400
    await record("PUT", "vm.remove-device", { id: "gpu0" }); // 204
    await record("PUT", "vm.remove-device", { id: "nothing" }); // 404
    expect(seen.map(([, , status]) => status)).toEqual([404, 204, 200, 200, 200, 409, 400, 204, 404]);
    for (const [endpoint, method, status] of seen)
      expect([endpoint, method, status, declared(endpoint, method, status)]).toEqual([endpoint, method, status, true]);
  });
});

// ---- §1 transport ----

describe("wire bytes (§1)", () => {
  test("a 200 has no reason phrase and exactly CH's headers", async () => {
    await start();
    const { responses } = await exchange(socketPath, requestBytes("GET", "vmm.ping"), 1);
    const [response] = responses;
    expect(response?.statusLine).toBe("HTTP/1.1 200 ");
    expect(response?.headers.map(([name]) => name)).toEqual(["Server", "Connection", "Content-Type", "Content-Length"]);
    expect(response?.headers.slice(0, 3)).toEqual([
      ["Server", "Cloud Hypervisor API"],
      ["Connection", "keep-alive"],
      ["Content-Type", "application/json"],
    ]);
    expect(Number(response?.headers[3]?.[1])).toBe(Buffer.byteLength(response?.body ?? ""));
  });

  test("a 204 carries neither Content-Type nor Content-Length", async () => {
    const ch = await start();
    ch.setState("Running");
    await call(socketPath, "PUT", "vm.add-device", { path: GPU, id: "gpu0" });
    const reply = await new Promise<string>((resolve) => {
      const socket = net.connect(socketPath, () =>
        socket.write(requestBytes("PUT", "vm.remove-device", { id: "gpu0" })),
      );
      socket.once("data", (chunk) => {
        socket.destroy();
        resolve(chunk.toString());
      });
    });
    expect(reply).toBe("HTTP/1.1 204 \r\nServer: Cloud Hypervisor API\r\nConnection: keep-alive\r\n\r\n");
  });

  test("pipelined requests on one connection are answered in order and the connection stays open", async () => {
    const ch = await start();
    ch.setState("Running");
    const bytes =
      requestBytes("PUT", "vm.add-device", { path: GPU }) +
      requestBytes("GET", "vm.info") +
      requestBytes("GET", "vmm.ping");
    const { responses, closed } = await exchange(socketPath, bytes, 3);
    expect(closed).toBe(false);
    expect(responses.map((r) => r.status)).toEqual([200, 200, 200]);
    expect(JSON.parse(responses[0]?.body ?? "")).toEqual({ id: "_vfio0", bdf: "0000:00:01.0" });
    expect(JSON.parse(responses[1]?.body ?? "").config.devices).toHaveLength(1);
    expect(JSON.parse(responses[2]?.body ?? "")).toHaveProperty("version");
  });

  test("requests on different connections are served one at a time, in arrival order", async () => {
    const ch = await start();
    ch.inject("vmm.ping", { kind: "delay", ms: 150 });
    const order: string[] = [];
    const slow = call(socketPath, "GET", "vmm.ping").then(() => order.push("slow"));
    await new Promise((resolve) => setTimeout(resolve, 30));
    const fast = call(socketPath, "GET", "vm.info").then(() => order.push("fast"));
    await Promise.all([slow, fast]);
    expect(order).toEqual(["slow", "fast"]);
  });

  test("replyDelayMs answers each request that long after its turn, still one at a time in order", async () => {
    await start({ replyDelayMs: 60 });
    const started = performance.now();
    const order: string[] = [];
    const first = call(socketPath, "GET", "vmm.ping").then(() => order.push("ping"));
    await new Promise((resolve) => setTimeout(resolve, 10));
    const second = call(socketPath, "GET", "vm.info").then(() => order.push("info"));
    await Promise.all([first, second]);
    expect(order).toEqual(["ping", "info"]);
    expect(performance.now() - started).toBeGreaterThanOrEqual(115);
  });

  test("the 11th connection gets micro_http's raw 503 and is closed", async () => {
    const release = await (await start()).occupyAllConnections();
    try {
      const raw = await new Promise<string>((resolve) => {
        let text = "";
        const socket = net.connect(socketPath);
        socket.on("data", (chunk) => (text += chunk.toString()));
        socket.on("close", () => resolve(text));
      });
      expect(raw).toBe(
        "HTTP/1.1 503\r\nServer: Firecracker API\r\nConnection: close\r\nContent-Length: 40\r\n\r\n" +
          '{ "error": "Too many open connections" }',
      );
    } finally {
      release();
    }
  });

  test("a PUT without a body is a Bad Request; a chunked body is not decoded", async () => {
    const ch = await start();
    ch.setState("Running");
    expect(await call(socketPath, "PUT", "vm.add-device")).toEqual({ status: 400, body: ["Bad Request"] });
    const chunked =
      'PUT /api/v1/vm.add-device HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n9\r\n{"path":1}\r\n0\r\n\r\n';
    const { responses } = await exchange(socketPath, chunked, 2);
    expect(responses[0]).toMatchObject({ status: 400, body: '["Bad Request"]' });
    expect(responses[1]?.status).toBe(400);
    expect(responses[1]?.headers[0]).toEqual(["Server", "Firecracker API"]);
    expect(responses[1]?.body).toBe(
      '{ "error": "Invalid request.\nAll previous unanswered requests will be dropped." }',
    );
    expect(ch.requests.map((r) => r.body)).toEqual([undefined, undefined]);
  });

  test("bad JSON, unknown paths and wrong methods get CH's answers", async () => {
    await start({ profile: "v53" });
    const badJson = await call(socketPath, "PUT", "vm.add-device", "{not json");
    expect(badJson.status).toBe(400);
    expect((badJson.body as string[])[0]).toBe("Failed to deserialize JSON");
    expect(await call(socketPath, "GET", "vm.nothing")).toEqual({ status: 404, body: ["Not Found"] });
    expect(await call(socketPath, "GET", "vm.add-device")).toEqual({ status: 400, body: ["Bad Request"] });
    expect(await call(socketPath, "PUT", "vm.info", {})).toEqual({ status: 400, body: ["Bad Request"] });
    const patch = (await exchange(socketPath, requestBytes("PATCH", "vm.info"), 1)).responses[0];
    expect(patch).toMatchObject({ status: 400, body: "" });
    expect(patch?.headers).toContainEqual(["Content-Length", "0"]);
    const del = (await exchange(socketPath, requestBytes("DELETE", "vm.info"), 1)).responses[0];
    expect(del?.body).toContain("Invalid HTTP Method: Unsupported HTTP method.");
  });

  test("main accepts DELETE in its parser and refuses it as an empty 400", async () => {
    await start({ profile: "main" });
    expect((await exchange(socketPath, requestBytes("DELETE", "vm.info"), 1)).responses[0]).toMatchObject({
      status: 400,
      body: "",
    });
  });

  test("the request log keeps method, endpoint, headers and parsed body", async () => {
    const ch = await start();
    await call(socketPath, "PUT", "vm.remove-device", { id: "x" });
    expect(ch.requests).toEqual([
      {
        method: "PUT",
        endpoint: "vm.remove-device",
        headers: { host: "localhost", "content-length": "10" },
        body: { id: "x" },
      },
    ]);
  });
});

// ---- §2–§5 the VMM ----

describe("VM state and device bookkeeping", () => {
  test.each([
    ["v52", 500],
    ["v53", 404],
    ["main", 404],
  ] as const)("%s: no VM created → %i with CH's chain", async (profile, status) => {
    await start({ profile });
    expect(await call(socketPath, "GET", "vm.info")).toEqual({
      status,
      body: ["Error from API", "The VM info is not available", "VM is not created"],
    });
    expect((await call(socketPath, "PUT", "vm.add-device", { path: GPU })).status).toBe(status);
  });

  test.each(["v52", "v53"] as const)(
    "%s: device_tree and devices are null vs absent until used, [] after the last removal",
    async (profile) => {
      const ch = await start({ profile, ejectAfterMs: 0 });
      ch.setState("Created");
      const created = (await call(socketPath, "GET", "vm.info")).body as Record<string, Record<string, unknown>>;
      const unset = profile === "v52" ? null : undefined;
      expect(created.device_tree).toBe(unset);
      expect(created.config?.devices).toBe(unset);
      ch.setState("Running");
      await call(socketPath, "PUT", "vm.add-device", { path: GPU, id: "gpu0" });
      const device = (
        (await call(socketPath, "GET", "vm.info")).body as { config: { devices: Array<Record<string, unknown>> } }
      ).config.devices[0];
      expect(device?.pci_device_id).toBe(unset);
      expect(device?.iommu).toBe(profile === "v52" ? false : undefined);
      await call(socketPath, "PUT", "vm.remove-device", { id: "gpu0" });
      const after = (await call(socketPath, "GET", "vm.info")).body as { config: { devices: unknown[] } };
      expect(after.config.devices).toEqual([]);
    },
  );

  test("Created: add-device only changes the config (204); boot names and places it", async () => {
    const ch = await start();
    ch.setState("Created");
    expect(await call(socketPath, "PUT", "vm.add-device", { path: GPU })).toEqual({ status: 204, body: undefined });
    ch.setState("Running");
    const info = (await call(socketPath, "GET", "vm.info")).body as {
      config: { devices: Array<{ id: string }> };
      device_tree: Record<string, { pci_bdf: string }>;
    };
    expect(info.config.devices[0]?.id).toBe("_vfio0");
    expect(info.device_tree._vfio0?.pci_bdf).toBe("0000:00:01.0");
  });

  test("auto ids share one counter across device kinds; slots are the lowest free", async () => {
    const ch = await start({ ejectAfterMs: 0 });
    ch.setState("Running");
    expect(ch.addDisk()).toBe("_disk0");
    expect((await call(socketPath, "PUT", "vm.add-device", { path: GPU })).body).toEqual({
      id: "_vfio1",
      bdf: "0000:00:02.0",
    });
    expect((await call(socketPath, "PUT", "vm.add-device", { path: NIC, id: "nic" })).body).toEqual({
      id: "nic",
      bdf: "0000:00:03.0",
    });
    await call(socketPath, "PUT", "vm.remove-device", { id: "_vfio1" });
    await new Promise((resolve) => setTimeout(resolve, 20));
    expect((await call(socketPath, "PUT", "vm.add-device", { path: GPU })).body).toEqual({
      id: "_vfio2",
      bdf: "0000:00:02.0",
    });
  });

  test.each([
    ["v52", 500],
    ["v53", 500],
    ["main", 409],
  ] as const)(
    "%s: a duplicate id or exact path → %i; a path differing by a slash is accepted",
    async (profile, status) => {
      const ch = await start({ profile });
      ch.setState("Running");
      await call(socketPath, "PUT", "vm.add-device", { path: GPU, id: "gpu0" });
      const id = await call(socketPath, "PUT", "vm.add-device", { path: NIC, id: "gpu0" });
      expect(id).toEqual({
        status,
        body: [
          "Error from API",
          "The device could not be added to the VM",
          "Failed to validate config",
          "Identifier gpu0 is not unique",
        ],
      });
      const samePath = await call(socketPath, "PUT", "vm.add-device", { path: GPU });
      expect(samePath.status).toBe(status);
      expect((samePath.body as string[]).at(-1)).toBe(`Duplicated device path: ${GPU}`);
      expect((await call(socketPath, "PUT", "vm.add-device", { path: `${GPU}/` })).status).toBe(200);
    },
  );

  test.each([
    ["v52", 204],
    ["v53", 500],
    ["main", 204],
  ] as const)("%s: removal stays pending until the guest ejects; a second remove → %i", async (profile, second) => {
    const ch = await start({ profile });
    ch.setState("Running");
    await call(socketPath, "PUT", "vm.add-device", { path: GPU, id: "gpu0" });
    expect((await call(socketPath, "PUT", "vm.remove-device", { id: "gpu0" })).status).toBe(204);
    expect(ch.pendingRemovals()).toEqual(["gpu0"]);
    const readd = await call(socketPath, "PUT", "vm.add-device", { path: GPU, id: "gpu0" });
    expect(readd).toEqual({
      status: 500,
      body: [
        "Error from API",
        "The device could not be added to the VM",
        "Error from device manager",
        "Invalid identifier as it is not unique: gpu0",
      ],
    });
    expect((await call(socketPath, "PUT", "vm.remove-device", { id: "gpu0" })).status).toBe(second);
    ch.guestEjects("gpu0");
    const info = (await call(socketPath, "GET", "vm.info")).body as { device_tree: Record<string, unknown> };
    expect(info.device_tree).toEqual({});
    expect((await call(socketPath, "PUT", "vm.add-device", { path: GPU, id: "gpu0" })).status).toBe(200);
  });

  test.each([
    ["v52", 500],
    ["v53", 500],
    ["main", 404],
  ] as const)("%s: removing an unknown id → %i", async (profile, status) => {
    const ch = await start({ profile });
    ch.setState("Running");
    expect(await call(socketPath, "PUT", "vm.remove-device", { id: "gpu0" })).toEqual({
      status,
      body: [
        "Error from API",
        "The device could not be removed from the VM",
        "Error from device manager",
        "Failed to find device corresponding to the given identifier: gpu0",
      ],
    });
  });

  test("the guest ejects by itself after ejectAfterMs", async () => {
    const ch = await start({ ejectAfterMs: 40 });
    ch.setState("Running");
    await call(socketPath, "PUT", "vm.add-device", { path: GPU, id: "gpu0" });
    await call(socketPath, "PUT", "vm.remove-device", { id: "gpu0" });
    expect(ch.pendingRemovals()).toEqual(["gpu0"]);
    await new Promise((resolve) => setTimeout(resolve, 80));
    expect(ch.pendingRemovals()).toEqual([]);
  });

  test("31 devices fill segment 0; the 32nd finds no slot", async () => {
    const ch = await start();
    ch.setState("Running");
    for (let slot = 1; slot < 32; slot++) {
      const bdf = `0000:${slot.toString(16).padStart(2, "0")}:00.0`;
      expect((await call(socketPath, "PUT", "vm.add-device", { path: `/sys/bus/pci/devices/${bdf}` })).status).toBe(
        200,
      );
    }
    const full = await call(socketPath, "PUT", "vm.add-device", { path: "/sys/bus/pci/devices/0000:40:00.0" });
    expect(full.status).toBe(500);
    expect((full.body as string[]).at(-1)).toBe("Could not find an available device slot on the PCI bus");
  });

  test.each([
    ["v52", 500, 500, 400],
    ["v53", 500, 500, 500],
    ["main", 400, 400, 400],
  ] as const)("%s: reserved id → %i, bad segment → %i, no path → %i", async (profile, reserved, segment, pathless) => {
    const ch = await start({ profile });
    ch.setState("Running");
    const reply = await call(socketPath, "PUT", "vm.add-device", { path: GPU, id: "__mine" });
    expect(reply).toEqual({ status: reserved, body: expect.arrayContaining(["Identifier __mine is not invalid"]) });
    expect((await call(socketPath, "PUT", "vm.add-device", { path: GPU, pci_segment: 1 })).status).toBe(segment);
    expect((await call(socketPath, "PUT", "vm.add-device", { Path: GPU })).status).toBe(pathless);
  });

  test("with a fake sysfs, add-device fails the way vfio-ioctls does", async () => {
    const sysfs = buildFakeSysfs([
      { bdf: "0000:01:00.0", driver: "vfio-pci", group: 12 },
      { bdf: "0000:02:00.0", driver: "vfio-pci" },
      { bdf: "0000:03:00.0", driver: "vfio-pci", group: 13 },
      { bdf: "0000:03:00.1", driver: "snd_hda_intel", group: 13 },
      { bdf: "0000:04:00.0", driver: "vfio-pci", group: 14 },
    ]);
    try {
      fs.rmSync(path.join(sysfs.root, "dev/vfio/14"));
      const ch = await start({ sysfsRoot: sysfs.root });
      ch.setState("Running");
      const add = async (bdf: string) =>
        (await call(socketPath, "PUT", "vm.add-device", { path: `/sys/bus/pci/devices/${bdf}` })).body as string[];
      expect(await add("0000:09:00.0")).toEqual([
        "Error from API",
        "The device could not be added to the VM",
        "Error from device manager",
        "Cannot create a VFIO device",
        "invalid file path",
      ]);
      expect((await add("0000:02:00.0")).at(-1)).toBe("invalid file path");
      expect((await add("0000:03:00.0")).at(-1)).toBe("group is not viable");
      expect((await add("0000:04:00.0")).at(-1)).toBe(
        "failed to open /dev/vfio/14 group: No such file or directory (os error 2)",
      );
      expect(await add("0000:01:00.0")).toEqual({ id: "_vfio0", bdf: "0000:00:01.0" });
    } finally {
      sysfs.cleanup();
    }
  });
});

describe("fault injection", () => {
  test("respond answers with the given status and body and changes nothing", async () => {
    const ch = await start();
    ch.setState("Running");
    ch.inject("vm.add-device", { kind: "respond", status: 500, body: '["boom"]' });
    expect(await call(socketPath, "PUT", "vm.add-device", { path: GPU })).toEqual({ status: 500, body: ["boom"] });
    expect(
      ((await call(socketPath, "GET", "vm.info")).body as { config: { devices?: unknown } }).config.devices,
    ).toBeUndefined();
  });

  test("close-mid-response acts, then drops the connection inside the body", async () => {
    const ch = await start();
    ch.setState("Running");
    ch.inject("vm.add-device", { kind: "close-mid-response" });
    const { responses, closed } = await exchange(socketPath, requestBytes("PUT", "vm.add-device", { path: GPU }), 1);
    expect(closed).toBe(true);
    expect(responses).toEqual([]);
    expect(
      ((await call(socketPath, "GET", "vm.info")).body as { config: { devices: unknown[] } }).config.devices,
    ).toHaveLength(1);
  });

  test("hang stalls that request and every later one, as CH's single API thread would", async () => {
    const ch = await start();
    ch.inject("vm.info", { kind: "hang" });
    const hung = exchange(socketPath, requestBytes("GET", "vm.info"), 1);
    const later = exchange(socketPath, requestBytes("GET", "vmm.ping"), 1);
    await new Promise((resolve) => setTimeout(resolve, 100));
    expect(ch.requests.map((r) => r.endpoint)).toEqual(["vm.info", "vmm.ping"]);
    await ch.close();
    double = undefined;
    expect((await hung).responses).toEqual([]);
    expect((await later).responses).toEqual([]);
  });
});
