// The Cloud Hypervisor client against the double over real Unix sockets: one test
// per endpoint and per error mapping, and how it uses CH's 10 connections.
import { spawn } from "node:child_process";
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { CloudHypervisorSockets, CONNECTIONS_PER_SOCKET, type CloudHypervisorClient } from "../../../src/backends/cloud-hypervisor/client";
import { Code, VfiodError, type Reason } from "../../../src/errors";
import { ChDouble, type ChProfile } from "../../support/ch-double";
import { vfiodRejection } from "../../support/rejection";
import { waitFor } from "../../support/wait";

const GPU = "/sys/bus/pci/devices/0000:01:00.0";
const VM = "web1";

let dir: string;
let socketPath: string;
let double: ChDouble | undefined;
let sockets: CloudHypervisorSockets;
const newClient = (): CloudHypervisorClient => sockets.client(socketPath, VM);

async function start(profile: ChProfile = "main"): Promise<{ ch: ChDouble; client: CloudHypervisorClient }> {
  double = await ChDouble.start(socketPath, { profile });
  return { ch: double, client: newClient() };
}

const signal = () => AbortSignal.timeout(5000);
/**
 * Upper bound for an answer due at a 100-200 ms deadline or wait: many times (>= 4x) that,
 * for a loaded 2-core machine, yet well short of the 5 s signal and of a hang. The codes
 * and messages say which limit answered; this only says it was not held up.
 */
const PROMPT_MS = 3000;

/** The VfiodError `promise` rejects with, checked for reason, code and safety for remote callers. */
async function failure(promise: Promise<unknown>, reason: Reason, code: Code): Promise<VfiodError> {
  const error = await vfiodRejection(promise);
  expect(error.message).toContain(VM);
  expect(error.message).not.toContain(dir);
  expect(error.message).not.toMatch(/\n\s+at /);
  expect({ reason: error.reason, code: error.code }).toEqual({ reason, code });
  return error;
}

/** What vmInfo throws against a bare server that meets the request with `onRequest`. */
async function vmInfoFromRawServer(
  onRequest: (socket: net.Socket) => void,
  reason: Reason,
  code: Code,
): Promise<VfiodError> {
  const server = net.createServer((socket) => socket.once("data", () => onRequest(socket)));
  await new Promise<void>((resolve) => server.listen(socketPath, resolve));
  try {
    return await failure(newClient().vmInfo(signal()), reason, code);
  } finally {
    await new Promise((resolve) => server.close(resolve));
  }
}

beforeEach(() => {
  sockets = new CloudHypervisorSockets(30_000);
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "vfiod-"));
  socketPath = path.join(dir, "api.sock");
});

afterEach(async () => {
  await sockets.close();
  await double?.close();
  double = undefined;
  fs.rmSync(dir, { recursive: true, force: true });
});

describe("endpoints", () => {
  test.each([
    ["v52", "52.0.0"],
    ["v53", "53.0.0"],
    ["main", "54.0.0"],
  ] as const)("%s: ping reports the version", async (profile, version) => {
    const { client } = await start(profile);
    expect((await client.ping(signal())).version).toBe(version);
  });

  test("vmInfo returns state, config and device_tree", async () => {
    const { ch, client } = await start();
    ch.setState("Running");
    await client.addDevice({ path: GPU, id: "gpu0" }, signal());
    const info = await client.vmInfo(signal());
    expect(info.state).toBe("Running");
    expect(info.config.devices).toEqual([expect.objectContaining({ id: "gpu0", path: GPU })]);
    expect(info.device_tree?.gpu0?.pci_bdf).toBe("0000:00:01.0");
  });

  test("addDevice sends the body once with Content-Length, never chunked", async () => {
    const { ch, client } = await start();
    ch.setState("Running");
    expect(await client.addDevice({ path: GPU, id: "gpu0" }, signal())).toEqual({ id: "gpu0", bdf: "0000:00:01.0" });
    const sent = ch.requests.filter((r) => r.endpoint === "vm.add-device");
    expect(sent).toHaveLength(1);
    expect(sent[0]?.method).toBe("PUT");
    expect(sent[0]?.body).toEqual({ path: GPU, id: "gpu0" });
    expect(sent[0]?.headers["content-length"]).toBe(String(JSON.stringify({ path: GPU, id: "gpu0" }).length));
    expect(sent[0]?.headers["transfer-encoding"]).toBeUndefined();
    expect(sent[0]?.headers["content-type"]).toBe("application/json");
  });

  test("addDevice on a created, unbooted VM returns undefined (204: config only)", async () => {
    const { ch, client } = await start();
    ch.setState("Created");
    expect(await client.addDevice({ path: GPU, id: "gpu0" }, signal())).toBeUndefined();
  });

  test("removeDevice resolves on 204", async () => {
    const { ch, client } = await start();
    ch.setState("Running");
    await client.addDevice({ path: GPU, id: "gpu0" }, signal());
    await client.removeDevice("gpu0", signal());
    expect(ch.requests.at(-1)).toMatchObject({ method: "PUT", endpoint: "vm.remove-device", body: { id: "gpu0" } });
    expect(ch.pendingRemovals()).toEqual(["gpu0"]);
  });

});

describe("connections", () => {
  test(`30 concurrent calls use at most ${CONNECTIONS_PER_SOCKET} connections; another API client still gets one meanwhile`, async () => {
    double = await ChDouble.start(socketPath, { replyDelayMs: 20 });
    const client = newClient();
    const calls = Array.from({ length: 30 }, () => client.ping(signal()));
    await waitFor(() => double!.openConnections === CONNECTIONS_PER_SOCKET, "vfiod's connections are open");
    // ch-remote, or cocoon's CLI, while vfiod's 30 calls are queued.
    const other = new CloudHypervisorSockets(5000);
    try {
      await expect(other.client(socketPath, VM).ping(signal())).resolves.toMatchObject({ version: "54.0.0" });
    } finally {
      await other.close();
    }
    await Promise.all(calls);
    expect(double.peakConnections).toBe(CONNECTIONS_PER_SOCKET + 1);
  });

  test("connections are kept between calls, and closed once idle so they hold none of CH's 10", async () => {
    const { ch, client } = await start();
    for (let i = 0; i < 15; i++) await client.ping(signal());
    expect(ch.openConnections).toBeGreaterThan(0);
    expect(ch.peakConnections).toBeLessThanOrEqual(CONNECTIONS_PER_SOCKET);
    await waitFor(() => ch.openConnections === 0, "the idle connections are closed", 2000);
  });
});

describe("transport failures", () => {
  test("a missing socket is HYPERVISOR_UNAVAILABLE", async () => {
    const client = newClient();
    const error = await failure(client.vmInfo(signal()), "HYPERVISOR_UNAVAILABLE", Code.UNAVAILABLE);
    expect(error.message).toContain("api socket does not exist");
  });

  test("a socket nobody listens on (ECONNREFUSED) is HYPERVISOR_UNAVAILABLE", async () => {
    // A killed listener leaves its socket file behind, as a crashed CH does.
    const child = spawn(process.execPath, [
      "-e",
      `require("net").createServer().listen(${JSON.stringify(socketPath)}, () => process.kill(process.pid, "SIGKILL"))`,
    ]);
    await new Promise((resolve) => child.once("exit", resolve));
    expect(fs.existsSync(socketPath)).toBe(true);
    const error = await failure(
      newClient().vmInfo(signal()),
      "HYPERVISOR_UNAVAILABLE",
      Code.UNAVAILABLE,
    );
    expect(error.message).toContain("connection refused");
  });

  test("a connection closed before any reply is HYPERVISOR_UNAVAILABLE", async () => {
    const error = await vmInfoFromRawServer((socket) => socket.destroy(), "HYPERVISOR_UNAVAILABLE", Code.UNAVAILABLE);
    expect(error.message).toContain("connection closed before a complete reply");
  });

  test("a reply that is not HTTP is HYPERVISOR_ERROR INTERNAL", async () => {
    const error = await vmInfoFromRawServer((s) => s.write("garbage\r\n\r\n"), "HYPERVISOR_ERROR", Code.INTERNAL);
    expect(error.message).toContain("malformed HTTP reply");
  });

  test("a connection closed mid-response is HYPERVISOR_UNAVAILABLE", async () => {
    const { ch, client } = await start();
    ch.setState("Running");
    ch.inject("vm.info", { kind: "close-mid-response" });
    const error = await failure(client.vmInfo(signal()), "HYPERVISOR_UNAVAILABLE", Code.UNAVAILABLE);
    expect(error.message).toContain("connection closed before a complete reply");
  });

  test("more than 10 open connections (micro_http's 503) is HYPERVISOR_UNAVAILABLE", async () => {
    const { ch, client } = await start();
    const release = await ch.occupyAllConnections();
    try {
      await failure(client.ping(signal()), "HYPERVISOR_UNAVAILABLE", Code.UNAVAILABLE);
    } finally {
      release();
    }
  });
});

describe("the signal", () => {
  test("a hanging CH and a deadline give DEADLINE_EXCEEDED quickly", async () => {
    const { ch, client } = await start();
    ch.inject("vm.info", { kind: "hang" });
    const started = Date.now();
    await failure(
      client.vmInfo(AbortSignal.timeout(100)),
      "HYPERVISOR_UNAVAILABLE",
      Code.DEADLINE_EXCEEDED,
    );
    expect(Date.now() - started).toBeLessThan(PROMPT_MS);
  });

  test("a cancelled read is CANCELLED", async () => {
    const { ch, client } = await start();
    ch.inject("vm.info", { kind: "hang" });
    const controller = new AbortController();
    setTimeout(() => controller.abort(), 50);
    await failure(client.vmInfo(controller.signal), "HYPERVISOR_UNAVAILABLE", Code.CANCELLED);
  });

  test("a sent add-device is awaited to its outcome even when the caller cancels", async () => {
    const { ch, client } = await start();
    ch.setState("Running");
    ch.inject("vm.add-device", { kind: "delay", ms: 300 });
    const controller = new AbortController();
    setTimeout(() => controller.abort(), 50);
    expect(await client.addDevice({ path: GPU, id: "gpu0" }, controller.signal)).toMatchObject({ id: "gpu0" });
    expect(controller.signal.aborted).toBe(true);
  });

  test("an add-device still queued behind busy connections when the caller cancels is never sent", async () => {
    const { ch, client } = await start();
    ch.setState("Running");
    // CH answers one request at a time: a hung ping keeps both of vfiod's connections to the socket busy.
    ch.inject("vmm.ping", { kind: "hang" });
    const reads = [client.ping(AbortSignal.timeout(2000)), client.ping(AbortSignal.timeout(2000))];
    await waitFor(() => ch.requests.length === 2, "both pings sent");
    const controller = new AbortController();
    setTimeout(() => controller.abort(), 100);
    await failure(client.addDevice({ path: GPU }, controller.signal), "HYPERVISOR_UNAVAILABLE", Code.CANCELLED);
    await Promise.allSettled(reads);
    expect(ch.requests.filter((r) => r.endpoint === "vm.add-device")).toEqual([]);
  });

  test("an already aborted signal sends nothing", async () => {
    const { ch, client } = await start();
    const controller = new AbortController();
    controller.abort();
    await failure(client.addDevice({ path: GPU }, controller.signal), "HYPERVISOR_UNAVAILABLE", Code.CANCELLED);
    expect(ch.requests).toEqual([]);
  });
});

describe("CH's refusals", () => {
  test.each(["v52", "v53", "main"] as const)("%s: no VM created is VM_NOT_RUNNING", async (profile) => {
    const { client } = await start(profile);
    const error = await failure(client.vmInfo(signal()), "VM_NOT_RUNNING", Code.FAILED_PRECONDITION);
    expect(error.message).toContain("VM is not created");
  });

  test.each(["v52", "v53", "main"] as const)("%s: a duplicate id is ID_IN_USE (500 or 409)", async (profile) => {
    const { ch, client } = await start(profile);
    ch.setState("Running");
    await client.addDevice({ path: GPU, id: "gpu0" }, signal());
    const error = await failure(
      client.addDevice({ path: "/sys/bus/pci/devices/0000:02:00.0", id: "gpu0" }, signal()),
      "ID_IN_USE",
      Code.ALREADY_EXISTS,
    );
    expect(error.message).toContain("Identifier gpu0 is not unique");
  });

  test("an id still pending eject is ID_IN_USE", async () => {
    const { ch, client } = await start();
    ch.setState("Running");
    await client.addDevice({ path: GPU, id: "gpu0" }, signal());
    await client.removeDevice("gpu0", signal());
    await failure(client.addDevice({ path: GPU, id: "gpu0" }, signal()), "ID_IN_USE", Code.ALREADY_EXISTS);
  });

  test("a duplicate path is DEVICE_ALREADY_ATTACHED", async () => {
    const { ch, client } = await start();
    ch.setState("Running");
    await client.addDevice({ path: GPU }, signal());
    await failure(client.addDevice({ path: GPU }, signal()), "DEVICE_ALREADY_ATTACHED", Code.ALREADY_EXISTS);
  });

  test.each(["v52", "v53", "main"] as const)("%s: removing an unknown id is DEVICE_NOT_ATTACHED", async (profile) => {
    const { ch, client } = await start(profile);
    ch.setState("Running");
    await failure(client.removeDevice("gpu0", signal()), "DEVICE_NOT_ATTACHED", Code.NOT_FOUND);
  });

  test("no free slot is NO_FREE_SLOT", async () => {
    const { ch, client } = await start();
    ch.setState("Running");
    for (let slot = 1; slot < 32; slot++) {
      await client.addDevice(
        { path: `/sys/bus/pci/devices/0000:${slot.toString(16).padStart(2, "0")}:00.0` },
        signal(),
      );
    }
    await failure(
      client.addDevice({ path: "/sys/bus/pci/devices/0000:40:00.0" }, signal()),
      "NO_FREE_SLOT",
      Code.RESOURCE_EXHAUSTED,
    );
  });

  test("a phrase is recognised anywhere in a longer chain", async () => {
    const { ch, client } = await start();
    ch.inject("vm.add-device", {
      kind: "respond",
      status: 500,
      body: '["Error from API","outer","Identifier gpu0 is not unique","cause"]',
    });
    await failure(client.addDevice({ path: GPU, id: "gpu0" }, signal()), "ID_IN_USE", Code.ALREADY_EXISTS);
  });

  test("another 4xx is HYPERVISOR_ERROR FAILED_PRECONDITION with the chain joined by ': '", async () => {
    const { ch, client } = await start("main");
    ch.setState("Running");
    const error = await failure(
      client.addDevice({ path: GPU, id: "__gpu" }, signal()),
      "HYPERVISOR_ERROR",
      Code.FAILED_PRECONDITION,
    );
    expect(error.message).toBe(
      `cloud-hypervisor vm ${VM}: vm.add-device: Error from API: The device could not be added to the VM: ` +
        "Failed to validate config: Identifier __gpu is not invalid",
    );
    expect(error.cause).toBeInstanceOf(Error);
  });

  test("an older CH's plain-text error is kept as is", async () => {
    const { ch, client } = await start();
    ch.inject("vm.remove-device", {
      kind: "respond",
      status: 400,
      body: "Error from API: The device could not be removed\n",
    });
    const error = await failure(client.removeDevice("gpu0", signal()), "HYPERVISOR_ERROR", Code.FAILED_PRECONDITION);
    expect(error.message).toBe(
      `cloud-hypervisor vm ${VM}: vm.remove-device: Error from API: The device could not be removed`,
    );
  });

  test.each([
    ["a 5xx is HYPERVISOR_ERROR INTERNAL with CH's text", "group is not viable", "HYPERVISOR_ERROR", Code.INTERNAL],
    [
      "the kernel's EBUSY on the group (another process holds it) is DEVICE_IN_USE with CH's text",
      "failed to open /dev/vfio/12 group: Device or resource busy (os error 16)",
      "DEVICE_IN_USE",
      Code.FAILED_PRECONDITION,
    ],
  ] as const)("%s", async (_what, cause, reason, code) => {
    const { ch, client } = await start();
    const chain = ["Error from API", "The device could not be added to the VM", "Error from device manager", "Cannot create a VFIO device", cause];
    ch.inject("vm.add-device", { kind: "respond", status: 500, body: JSON.stringify(chain) });
    const error = await failure(client.addDevice({ path: GPU }, signal()), reason, code);
    expect(error.message).toContain(chain.join(": "));
  });

  test("micro_http's own parse-error body is HYPERVISOR_ERROR INTERNAL", async () => {
    const { ch, client } = await start();
    ch.inject("vm.info", {
      kind: "respond",
      status: 400,
      body: '{ "error": "Invalid request.\nAll previous unanswered requests will be dropped." }',
    });
    await failure(client.vmInfo(signal()), "HYPERVISOR_ERROR", Code.INTERNAL);
  });

  test.each([
    ["garbage", '{"config": tru'],
    ["the wrong shape", '{"state":"Running"}'],
  ])("a 200 vm.info with %s is HYPERVISOR_ERROR INTERNAL", async (_what, body) => {
    const { ch, client } = await start();
    ch.inject("vm.info", { kind: "respond", status: 200, body });
    const error = await failure(client.vmInfo(signal()), "HYPERVISOR_ERROR", Code.INTERNAL);
    expect(error.message).toContain("unparseable reply");
  });

  test("a 200 add-device without id and bdf is HYPERVISOR_ERROR INTERNAL", async () => {
    const { ch, client } = await start();
    ch.inject("vm.add-device", { kind: "respond", status: 200, body: '{"id":"gpu0"}' });
    await failure(client.addDevice({ path: GPU }, signal()), "HYPERVISOR_ERROR", Code.INTERNAL);
  });
});
