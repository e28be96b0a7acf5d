// The QMP client against real QEMU 7.2 (and the double where QEMU cannot show it),
// plus a parity check that the double answers like QEMU.
import net from "node:net";
import path from "node:path";
import { Code } from "../../../src/errors";
import { QmpClient, QmpError, type QmpEvent } from "../../../src/backends/qemu/qmp";
import { QmpDouble } from "../../support/qmp-double";
import { qemuAvailable, startQemu, stopAllQemu } from "../../support/qemu-vm";
import { waitFor } from "../../support/wait";
import { vfiodRejection } from "../../support/rejection";

const label = 'qemu VM "t1"';
const connect = (socket: string, signal = AbortSignal.timeout(10_000), greetingTimeoutMs?: number) =>
  QmpClient.connect(socket, { label, signal, greetingTimeoutMs });


/** Holds the monitor like another tool would: reads the greeting and stays. */
async function occupy(socket: string): Promise<net.Socket> {
  const holder = net.createConnection(socket);
  await new Promise<void>((resolve) => holder.once("data", () => resolve()));
  return holder;
}

const describeQemu = qemuAvailable() ? describe : describe.skip;

describeQemu("QmpClient against real QEMU", () => {
  const clients: QmpClient[] = [];
  const holders: net.Socket[] = [];
  const open = async (socket: string, signal?: AbortSignal, greetingTimeoutMs?: number) => {
    const client = await connect(socket, signal, greetingTimeoutMs);
    clients.push(client);
    return client;
  };
  afterEach(async () => {
    clients.splice(0).forEach((c) => c.close());
    holders.splice(0).forEach((h) => h.destroy());
    await stopAllQemu();
  });

  test("reads the greeting, negotiates, and runs commands", async () => {
    const vm = await startQemu();
    const client = await open(vm.socket);
    expect(client.greeting?.version.qemu.major).toBeGreaterThanOrEqual(7);
    expect(client.greeting?.capabilities).toContain("oob");
    await expect(client.execute("query-status", undefined, AbortSignal.timeout(5000))).resolves.toMatchObject({
      status: "running",
    });
  });

  test("matches pipelined replies to their commands by id", async () => {
    const vm = await startQemu({ rootPorts: 3 });
    const client = await open(vm.socket);
    const signal = AbortSignal.timeout(5000);
    const typeOf = (id: string) => client.execute("qom-get", { path: `/machine/peripheral/${id}`, property: "chassis" }, signal);
    const [rp3, status, rp1, rp2] = await Promise.all([
      typeOf("rp3"),
      client.execute("query-status", undefined, signal),
      typeOf("rp1"),
      typeOf("rp2"),
    ]);
    expect([rp1, rp2, rp3]).toEqual([1, 2, 3]);
    expect(status).toMatchObject({ status: "running" });
  });

  test("an error reply keeps QEMU's class and desc, and the session goes on", async () => {
    const vm = await startQemu();
    const client = await open(vm.socket);
    const signal = AbortSignal.timeout(5000);
    const err = await vfiodRejection(client.execute("qom-list", { path: "/machine/peripheral/nope" }, signal));
    expect(err).toBeInstanceOf(QmpError);
    expect(err).toMatchObject({
      reason: "HYPERVISOR_ERROR",
      code: Code.FAILED_PRECONDITION,
      qmpClass: "DeviceNotFound",
      desc: "Device '/machine/peripheral/nope' not found",
    });
    expect(err.message).toBe(`${label}: qom-list: Device '/machine/peripheral/nope' not found`);
    const again = await vfiodRejection(client.execute("qmp_capabilities", undefined, signal));
    expect(again).toMatchObject({ qmpClass: "CommandNotFound", desc: "Capabilities negotiation is already complete, command ignored" });
    await expect(client.execute("query-status", undefined, signal)).resolves.toMatchObject({ status: "running" });
  });

  test("delivers events while a command is in flight (RESUME before cont's reply)", async () => {
    const vm = await startQemu({ args: ["-S"] });
    const client = await open(vm.socket);
    const signal = AbortSignal.timeout(5000);
    const seen: string[] = [];
    client.onEvent((e: QmpEvent) => seen.push(`event ${e.event}`));
    const resumed = client.waitEvent((e) => e.event === "RESUME", signal, "RESUME");
    await client.execute("cont", undefined, signal).then(() => seen.push("reply cont"));
    expect(seen).toEqual(["event RESUME", "reply cont"]);
    expect((await resumed).timestamp?.seconds).toBeGreaterThan(0);
  });

  test("a second client gets UNAVAILABLE (monitor busy) within the greeting bound, not a hang", async () => {
    const vm = await startQemu();
    await open(vm.socket);
    const started = Date.now();
    const err = await vfiodRejection(connect(vm.socket, AbortSignal.timeout(30_000)));
    const elapsed = Date.now() - started;
    // UNAVAILABLE (not DEADLINE_EXCEEDED) is the greeting bound's answer, not the caller's deadline's.
    expect(err).toMatchObject({ reason: "HYPERVISOR_UNAVAILABLE", code: Code.UNAVAILABLE });
    expect(err.message).toMatch(/busy.*another client/);
    expect(err.message).not.toContain(vm.socket);
    expect(elapsed).toBeGreaterThanOrEqual(1900);
    expect(elapsed).toBeLessThan(4 * 2000); // the 2 s greeting bound, with room for a loaded machine
  });

  test("the caller's signal bounds the greeting wait: DEADLINE_EXCEEDED or CANCELLED", async () => {
    const vm = await startQemu();
    holders.push(await occupy(vm.socket));
    const started = Date.now();
    const late = await vfiodRejection(connect(vm.socket, AbortSignal.timeout(150)));
    expect(Date.now() - started).toBeLessThan(1900); // before the 2 s greeting bound could answer instead
    expect(late).toMatchObject({ reason: "HYPERVISOR_UNAVAILABLE", code: Code.DEADLINE_EXCEEDED });
    const gone = new AbortController();
    setTimeout(() => gone.abort(), 50);
    expect(await vfiodRejection(connect(vm.socket, gone.signal))).toMatchObject({ code: Code.CANCELLED });
  });

  test("once the first client leaves, the next one is served", async () => {
    const vm = await startQemu();
    const holder = await occupy(vm.socket);
    const next = connect(vm.socket, AbortSignal.timeout(10_000), 5000);
    setTimeout(() => holder.destroy(), 200);
    const client = await next;
    clients.push(client);
    await expect(client.execute("query-status", undefined, AbortSignal.timeout(5000))).resolves.toBeDefined();
  });

  test("an abort in flight rejects that command only; the late reply is not mistaken for the next", async () => {
    const vm = await startQemu();
    const client = await open(vm.socket);
    const stop = new AbortController();
    const status = client.execute("query-status", undefined, stop.signal);
    stop.abort();
    expect(await vfiodRejection(status)).toMatchObject({ reason: "HYPERVISOR_UNAVAILABLE", code: Code.CANCELLED });
    const type = await client.execute("qom-get", { path: "/machine/peripheral/rp1", property: "type" }, AbortSignal.timeout(5000));
    expect(type).toBe("pcie-root-port");
  });

  test("QEMU dying fails waiters with UNAVAILABLE; its leftover socket refuses; a missing one too", async () => {
    const vm = await startQemu();
    const client = await open(vm.socket);
    const never = client.waitEvent(() => false, AbortSignal.timeout(10_000), "nothing");
    await vm.kill();
    const lost = await vfiodRejection(never);
    expect(lost).toMatchObject({ reason: "HYPERVISOR_UNAVAILABLE", code: Code.UNAVAILABLE });
    expect(lost.message).toBe(`${label}: QMP connection closed by QEMU`);

    const refused = await vfiodRejection(connect(vm.socket));
    expect(refused).toMatchObject({ reason: "HYPERVISOR_UNAVAILABLE", code: Code.UNAVAILABLE });
    expect(refused.message).toBe(`${label}: QMP socket refused the connection (QEMU is not running)`);
    const missing = await vfiodRejection(connect(path.join(path.dirname(vm.socket), "absent.sock")));
    expect(missing.message).toBe(`${label}: QMP socket does not exist (VM not started or gone)`);
    expect(missing.cause).toMatchObject({ code: "ENOENT" });
  });

  test("the QMP double answers a conversation exactly like QEMU", async () => {
    const args = ["-device", "e1000e,id=nic1,bus=rp2"];
    const vm = await startQemu({ args });
    const double = await QmpDouble.start({ devices: [{ id: "nic1", driver: "e1000e", bus: "rp2" }] });
    try {
      const [real, fake] = await Promise.all([converse(vm.socket), converse(double.socket)]);
      expect(fake.raw.endsWith("\r\n")).toBe(true);
      expect(fake.raw.split("\r\n").length).toBe(real.raw.split("\r\n").length);
      const greeting = (m: Record<string, unknown>) => Object.keys((m.QMP ?? {}) as object);
      expect(greeting(fake.messages[0] ?? {})).toEqual(greeting(real.messages[0] ?? {}));
      expect(fake.messages.slice(1)).toEqual(real.messages.slice(1));
    } finally {
      await double.close();
    }
  });
  test.each([
    ["acpi", [{ return: {} }, { return: {} }]],
    ["native", [{ return: {} }, { error: { class: "GenericError", desc: "Device nic1 is already in the process of unplug" } }]],
  ] as const)("%s hot-plug: the QMP double answers a repeated device_del like QEMU", async (hotplug, answers) => {
    // A running VM with no guest OS never acknowledges the unplug of a NIC present at boot.
    const native = hotplug === "native" ? ["-global", "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off"] : [];
    const vm = await startQemu({ args: ["-device", "e1000e,id=nic1,bus=rp2", ...native] });
    const double = await QmpDouble.start({ hotplug, unplugAfterMs: null, devices: [{ id: "nic1", driver: "e1000e", bus: "rp2" }] });
    // The double is a VM whose firmware has run; in ACPI mode QEMU refuses a repeat until it has
    // (measured: "already in the process of unplug" right after start under a loaded TCG).
    await firmwareNumberedBuses(vm.socket);
    try {
      const [real, fake] = await Promise.all([repeatDeviceDel(vm.socket), repeatDeviceDel(double.socket)]);
      expect(real).toEqual([...answers, "nic1 still held"]);
      expect(fake).toEqual(real);
    } finally {
      await double.close();
    }
  });
});

/** Waits until the VM's firmware has given its root ports bus numbers (query-pci, qemu-qmp.md §5). */
async function firmwareNumberedBuses(socket: string): Promise<void> {
  const client = await connect(socket);
  try {
    await waitFor(async () => {
      const buses = (await client.execute("query-pci", undefined, AbortSignal.timeout(5000))) as {
        devices: { pci_bridge?: { bus: { secondary: number } } }[];
      }[];
      return buses.some((bus) => bus.devices.some((d) => (d.pci_bridge?.bus.secondary ?? 0) > 0));
    }, "the firmware numbers the buses", 30_000, 100);
  } finally {
    client.close();
  }
}

/** device_del of nic1, again 100 ms later, then whether QEMU still holds it: the answers in order. */
async function repeatDeviceDel(socket: string): Promise<unknown[]> {
  const client = await connect(socket);
  const signal = AbortSignal.timeout(5000);
  const answer = (command: Promise<unknown>) =>
    command.then(
      (value) => ({ return: value }),
      (err: QmpError) => ({ error: { class: err.qmpClass, desc: err.desc } }),
    );
  try {
    const first = await answer(client.execute("device_del", { id: "nic1" }, signal));
    await new Promise((resolve) => setTimeout(resolve, 100));
    const second = await answer(client.execute("device_del", { id: "nic1" }, signal));
    const peripherals = (await client.execute("qom-list", { path: "/machine/peripheral" }, signal)) as { name: string }[];
    return [first, second, peripherals.some((p) => p.name === "nic1") ? "nic1 still held" : "nic1 gone"];
  } finally {
    client.close();
  }
}

const CONVERSATION = [
  { execute: "query-status", id: 1 },
  { execute: "qmp_capabilities", id: { any: ["json", 1] } },
  { execute: "qmp_capabilities", id: "again" },
  { execute: "nope", id: 4 },
  { execute: "qom-get", arguments: { path: "/machine/peripheral/rp1", property: "type" }, id: 5 },
  { execute: "qom-get", arguments: { path: "/machine/peripheral/nic1", property: "host" }, id: 6 },
  { execute: "qom-list", arguments: { path: "/machine/peripheral/nope" }, id: 7 },
  { execute: "device_add", arguments: { driver: "vfio-pci", id: "1abc", bus: "rp1" }, id: 8 },
  { execute: "device_add", arguments: { driver: "vfio-pci", id: "nic1", bus: "rp1" }, id: 9 },
  { execute: "device_add", arguments: { driver: "vfio-pci", id: "h1", sysfsdev: "/sys/bus/pci/devices/0000:7f:1f.7" }, id: 10 },
  { execute: "device_add", arguments: { driver: "vfio-pci", id: "h1", bus: "rp99" }, id: 11 },
  { execute: "device_add", arguments: { driver: "vfio-pci", id: "h1", bus: "rp1" }, id: 12 },
  { execute: "device_add", arguments: { driver: "vfio-pci", id: "h1", bus: "rp1", sysfsdev: "/sys/bus/pci/devices/10000:7f:1f.7" }, id: 13 },
  { execute: "device_del", arguments: { id: "zz" }, id: 14 },
];

/** Sends the whole conversation at once, without newlines, and reads one reply per command after the greeting. */
async function converse(socket: string): Promise<{ raw: string; messages: Record<string, unknown>[] }> {
  const conn = net.createConnection(socket);
  conn.setEncoding("utf8");
  let raw = "";
  const expected = CONVERSATION.length + 1;
  await new Promise<void>((resolve, reject) => {
    conn.on("error", reject);
    conn.on("data", (chunk: string) => {
      raw += chunk;
      if (raw.split("\r\n").length > expected) resolve();
    });
    conn.write(CONVERSATION.map((c) => JSON.stringify(c)).join(""));
  });
  conn.destroy();
  const messages = raw
    .split("\r\n")
    .filter((l) => l !== "")
    .map((l) => JSON.parse(l) as Record<string, unknown>);
  return { raw, messages };
}

describe("QmpClient against the QMP double", () => {
  let double: QmpDouble | undefined;
  afterEach(async () => {
    await double?.close();
    double = undefined;
  });

  test("nothing is sent once the signal has aborted", async () => {
    double = await QmpDouble.start();
    const client = await connect(double.socket);
    try {
      const stop = new AbortController();
      stop.abort();
      await expect(client.execute("query-status", undefined, stop.signal)).rejects.toMatchObject({ code: Code.CANCELLED });
      await client.execute("query-pci", undefined, AbortSignal.timeout(5000));
      expect(double.log.map((c) => c.execute)).toEqual(["qmp_capabilities", "query-pci"]);
    } finally {
      client.close();
    }
  });

  test("a monitor closing mid-command fails that command with UNAVAILABLE naming it", async () => {
    double = await QmpDouble.start({ hangUpBefore: "query-pci" });
    const client = await connect(double.socket);
    const err = await vfiodRejection(client.execute("query-pci", undefined, AbortSignal.timeout(5000)));
    expect(err).toMatchObject({ reason: "HYPERVISOR_UNAVAILABLE", code: Code.UNAVAILABLE });
    expect(err.message).toBe(`${label}: query-pci: QMP connection closed by QEMU`);
    await expect(client.execute("query-status", undefined, AbortSignal.timeout(5000))).rejects.toMatchObject({
      reason: "HYPERVISOR_UNAVAILABLE",
    });
  });

  test("a monitor that never greets is reported busy after the greeting bound", async () => {
    double = await QmpDouble.start({ greets: false });
    const started = Date.now();
    const err = await vfiodRejection(connect(double.socket, AbortSignal.timeout(10_000), 300));
    expect(Date.now() - started).toBeLessThan(4000); // the 300 ms greeting bound answered, not the 10 s signal
    expect(err).toMatchObject({ code: Code.UNAVAILABLE });
    expect(err.message).toBe(`${label}: QMP monitor busy: no greeting within 300 ms (another client is connected)`);
  });
});
