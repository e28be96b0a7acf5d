// What the DeviceService fuzz suites share (grpc-fuzz.test.ts: 100,000 Attach
// requests; grpc-fuzz-raw.test.ts: Detach ids, List refs and malformed protobuf
// bytes): the fake host and VMs, oracles written from ../shared/contract.md and
// the README (not from src), the input generators, and a lab holding one
// in-process vfiod with three Cloud Hypervisor doubles.
//
// The two suites are separate files so jest's two workers run them side by side.
import * as grpc from "@grpc/grpc-js";
import { create, toBinary, type DescMessage } from "@bufbuild/protobuf";
import fc from "fast-check";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { CloudHypervisorBackend } from "../../src/backends/cloud-hypervisor/backend";
import { BackendRegistry } from "../../src/backends/registry";
import { ChDouble, type ChRequest } from "../support/ch-double";
import { buildFakeSysfs, type FakeSysfs } from "../support/fake-sysfs";
import { checkHealth } from "../support/grpc-clients";
import { isContractRefusal, rawVmInfo, type Outcome } from "../support/load";
import { startTestServer, type TestServer } from "../support/test-server";

/** Seeds every generator; printed with the figures, VFIOD_FUZZ_SEED=<n> replays a run. */
export const SEED = Number(process.env.VFIOD_FUZZ_SEED ?? Math.floor(Math.random() * 0x7fffffff));
export const IN_FLIGHT = 64;
/** A call unanswered this long is a hang (runPool's watchdog, not a per-call deadline). */
export const HANG_MS = 20_000;

export const SYSFS_PREFIX = "/sys/bus/pci/devices/";
const FULL_BDF = /^(?:[0-9a-f]{4}|[1-9a-f][0-9a-f]{4}):[0-9a-f]{2}:[01][0-9a-f]\.[0-7]$/;
const SHORT_BDF = /^[0-9a-f]{2}:[01][0-9a-f]\.[0-7]$/;
const CALLER_ID = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$/;

// ---- the host and the VMs ----

/** vfio-bound, viable: Attach may reach the hypervisor. */
export const VFIO_DEVICES = ["0000:01:00.0", "0000:01:00.1", "0000:0a:1f.7", "0000:3b:00.0", "0000:af:10.3", "10000:01:00.0"];
/** vfio-bound and viable, never generated: the final plain Attach uses it. */
export const RESERVED = "0000:7f:1f.7";
const NOT_VFIO = ["0000:05:00.0", "0000:06:00.1"];
const NOT_VIABLE = ["0000:06:00.0", "0000:07:00.0"];
const KNOWN = new Set([...VFIO_DEVICES, RESERVED, ...NOT_VFIO, ...NOT_VIABLE]);

export const VMS = [
  { name: "fuzz-a", id: "4f1c2a90-aaaa" },
  { name: "fuzz-b", id: "4f1c9d31-bbbb" },
  { name: "fuzz-c", id: "7e0b55aa-cccc" },
];

export type Expected =
  | { kind: "invalid" }
  | { kind: "reaches"; bdf: string }
  | { kind: "refused"; key: string };

// ---- oracles, from the contract and README rather than from src ----

/**
 * The BDF the contract says `input` names, or undefined when it must be
 * INVALID_ARGUMENT. The 256-character cap is vfiod's (src/pci/address.ts); the
 * rest is README's "01:00.0, 0000:01:00.0 or /sys/bus/pci/devices/0000:01:00.0",
 * device 00-1f, function 0-7, 4-digit domain or 5-digit one as the kernel writes it
 * (%04x: no leading zero), surrounding whitespace
 * trimmed, a path cleaned of "//" and "." but never holding "..".
 */
export function expectedBdf(input: string): string | undefined {
  if (input.length > 256) return undefined;
  const trimmed = input.trim();
  if (trimmed.startsWith("/")) {
    if (trimmed.split("/").includes("..")) return undefined;
    const cleaned = path.posix.normalize(trimmed).replace(/\/+$/, "");
    const bdf = cleaned.startsWith(SYSFS_PREFIX) ? cleaned.slice(SYSFS_PREFIX.length).toLowerCase() : "";
    return FULL_BDF.test(bdf) ? bdf : undefined;
  }
  const lower = trimmed.toLowerCase();
  if (FULL_BDF.test(lower)) return lower;
  if (SHORT_BDF.test(lower)) return `0000:${lower}`;
  return undefined;
}

export function callerIdValid(id: string): boolean {
  return id === "" || (CALLER_ID.test(id) && !id.startsWith("cocoon-"));
}

/** Detach accepts hypervisor-chosen ids: non-empty, at most 128 characters, no control or format characters, no line or paragraph separators. */
export function existingIdValid(id: string): boolean {
  return id !== "" && id.length <= 128 && !/[\p{Cc}\p{Cf}\p{Zl}\p{Zp}]/u.test(id);
}

export function expectedAttach(pci: string, id: string): Expected {
  const bdf = expectedBdf(pci);
  if (bdf === undefined || !callerIdValid(id)) return { kind: "invalid" };
  if (VFIO_DEVICES.includes(bdf) || bdf === RESERVED) return { kind: "reaches", bdf };
  if (NOT_VFIO.includes(bdf)) return { kind: "refused", key: "FAILED_PRECONDITION/DEVICE_NOT_VFIO" };
  if (NOT_VIABLE.includes(bdf)) return { kind: "refused", key: "FAILED_PRECONDITION/IOMMU_GROUP_NOT_VIABLE" };
  return { kind: "refused", key: "NOT_FOUND/DEVICE_NOT_FOUND" };
}

/** Exact id, else exact name, else a unique id prefix of 3+ characters (README "VM inventory"). */
export function expectedVm(ref: string): { vm: string } | { key: string } {
  if (ref.trim() === "") return { key: "INVALID_ARGUMENT/INVALID_ARGUMENT" };
  for (const tier of [
    VMS.filter((vm) => vm.id === ref),
    VMS.filter((vm) => vm.name === ref),
    ref.length >= 3 ? VMS.filter((vm) => vm.id.startsWith(ref)) : [],
  ]) {
    if (tier.length === 1) return { vm: tier[0]!.name };
    if (tier.length > 1) return { key: "FAILED_PRECONDITION/VM_AMBIGUOUS" };
  }
  return { key: "NOT_FOUND/VM_NOT_FOUND" };
}

// ---- generators ----

const WHITESPACE = [" ", "\t", "\n", "\r", "\v", "\f", "\u00a0", "\u2028", "\u2029", "\ufeff", "\u3000"];
const NOT_WHITESPACE = ["\u0000", "\u200b", "\u0085", "\u180e", "\u001f", "\u007f"];
const hexUnit = fc.constantFrom(..."0123456789abcdefABCDEF");
const hex = (minLength: number, maxLength: number) => fc.string({ unit: hexUnit, minLength, maxLength });
const padding = fc.string({ unit: fc.constantFrom(...WHITESPACE, ...NOT_WHITESPACE), maxLength: 3 });

function randomCase(text: string, upper: number): string {
  return [...text].map((c, i) => ((upper >> i % 30) & 1 ? c.toUpperCase() : c)).join("");
}

const shortOf = (bdf: string) => (bdf.startsWith("0000:") ? bdf.slice(5) : bdf);

/** Short, full and sysfs-path forms of `devices`, in random case, with trimmable whitespace around. */
const formsOf = (devices: string[]) =>
  fc
    .record({
      bdf: fc.constantFrom(...devices),
      form: fc.constantFrom("short", "full", "path"),
      upper: fc.nat(),
      prefix: fc.constantFrom(SYSFS_PREFIX, "//sys/bus/pci/devices/", "/sys//bus/pci/./devices/", "/./sys/bus/pci/devices//"),
      trailing: fc.constantFrom("", "/", "//", "/.", "/./"),
      before: fc.string({ unit: fc.constantFrom(...WHITESPACE), maxLength: 2 }),
      after: fc.string({ unit: fc.constantFrom(...WHITESPACE), maxLength: 2 }),
    })
    .map(({ bdf, form, upper, prefix, trailing, before, after }) => {
      const core = form === "short" ? shortOf(bdf) : bdf;
      const typed = form === "path" ? `${prefix}${randomCase(core, upper)}${trailing}` : randomCase(core, upper);
      return `${before}${typed}${after}`;
    });

/** Forms of the vfio-bound fake devices: these reach the hypervisor. */
const validPci = formsOf(VFIO_DEVICES);
/** Forms of the fake devices preflight refuses (another driver, a non-viable group, no IOMMU group). */
const refusedPci = formsOf([...NOT_VFIO, ...NOT_VIABLE]);

/** Well-formed BDFs of devices the fake host lacks. */
const missingBdf = fc
  .record({
    domain: fc.integer({ min: 0, max: 0x1ffff }),
    bus: fc.integer({ min: 0, max: 0xff }),
    dev: fc.integer({ min: 0, max: 0x1f }),
    fn: fc.integer({ min: 0, max: 7 }),
    short: fc.boolean(),
  })
  .map(({ domain, bus, dev, fn, short }) => {
    const h = (n: number, w: number) => n.toString(16).padStart(w, "0");
    const full = `${h(domain, 4)}:${h(bus, 2)}:${h(dev, 2)}.${fn}`;
    return short && domain === 0 ? full.slice(5) : full;
  })
  .filter((pci) => !KNOWN.has(pci.length < 12 ? `0000:${pci}` : pci));

/**
 * Well-shaped BDFs with one field out of range: device 20-ff, function 8-f, a 1-3 or
 * 6-digit domain or a 5-digit one with a leading zero, a 1- or 3-digit bus.
 */
const outOfRangeBdf = fc
  .record({
    field: fc.constantFrom("device", "function", "domain", "bus"),
    domain: fc.integer({ min: 0, max: 0xffff }),
    bus: fc.integer({ min: 0, max: 0xff }),
    dev: fc.integer({ min: 0, max: 0x1f }),
    badDev: fc.integer({ min: 0x20, max: 0xff }),
    fn: fc.integer({ min: 0, max: 7 }),
    badFn: fc.constantFrom(..."89abcdefABCDEF"),
    badDomain: fc.oneof(hex(3, 3), hex(6, 6), hex(1, 2), hex(4, 4).map((d) => `0${d}`)),
    badBus: fc.oneof(hex(1, 1), hex(3, 3)),
    form: fc.constantFrom("short", "full", "path"),
  })
  .map(({ field, domain, bus, dev, badDev, fn, badFn, badDomain, badBus, form }) => {
    const h = (n: number, w: number) => n.toString(16).padStart(w, "0");
    const d = field === "domain" ? badDomain : h(domain, 4);
    const b = field === "bus" ? badBus : h(bus, 2);
    const tail = `${field === "device" ? h(badDev, 2) : h(dev, 2)}.${field === "function" ? badFn : fn}`;
    if (form === "short") return `${b}:${tail}`;
    return form === "path" ? `${SYSFS_PREFIX}${d}:${b}:${tail}` : `${d}:${b}:${tail}`;
  });

/** BDF look-alikes: fields too long or short, device 20-ff, function 8-f, wrong separators. */
const bdfLike = fc
  .record({
    domain: fc.option(hex(0, 6)),
    bus: hex(0, 3),
    dev: hex(0, 3),
    fn: fc.string({ unit: fc.constantFrom(..."0123456789aAfF-+x"), maxLength: 2 }),
    s1: fc.constantFrom(":", ":", ":", ".", "", "::", "-", "_", "：", " "),
    s2: fc.constantFrom(":", ":", ".", "", "-", "::"),
    s3: fc.constantFrom(".", ".", ".", ":", "", "..", ",", "．"),
  })
  .map(({ domain, bus, dev, fn, s1, s2, s3 }) => `${domain === null ? "" : `${domain}${s2}`}${bus}${s1}${dev}${s3}${fn}`);

const pathLike = fc
  .record({
    prefix: fc.constantFrom(
      SYSFS_PREFIX,
      "/sys/bus/pci/devices/../devices/",
      "/sys/bus/pci/devices/../../../../",
      "/sys/bus/pci/devices/./../devices/",
      "/sys/bus/pci/drivers/vfio-pci/",
      "/sys/devices/pci0000:00/0000:00:01.0/",
      "sys/bus/pci/devices/",
      "./sys/bus/pci/devices/",
      "../sys/bus/pci/devices/",
      "/SYS/BUS/PCI/DEVICES/",
      "/sys/bus/pci/devices",
      "\\sys\\bus\\pci\\devices\\",
      "file:///sys/bus/pci/devices/",
      "/proc/self/root/sys/bus/pci/devices/",
      "/sys/bus/pci/devices/0000:01:00.0/../",
      "/sys/bus/pci/devices/.../",
      "/sys/bus/pci/devices/%2e%2e/",
      "/sys/bus/pci/devices/\u0000/",
      "/dev/vfio/",
      "/etc/passwd",
      "/",
      "//",
      "/sys/bus/pci/devices//",
      "/sys/bus/pci/devices/./",
      "/sys/bus/pci/slots/",
    ),
    middle: fc.oneof(
      fc.constantFrom(...VFIO_DEVICES, ...VFIO_DEVICES.map(shortOf)),
      fc.constantFrom("..", ".", "", "0000:01:00.0/..", "vfio", "*", "0000:01:00.*"),
      bdfLike,
    ),
    suffix: fc.constantFrom(
      "",
      "/",
      "//",
      "/.",
      "/..",
      "/./",
      "/../0000:01:00.1",
      "/config",
      "/driver",
      "\u0000",
      "%00",
      "\n",
      " ",
      "/ ",
      "?x",
      "#",
      "/.\u0000",
    ),
  })
  .map(({ prefix, middle, suffix }) => `${prefix}${middle}${suffix}`);

const segments = fc
  .array(fc.constantFrom("", ".", "..", "sys", "bus", "pci", "devices", "0000:01:00.0", "01:00.0", "...", "Sys"), {
    maxLength: 9,
  })
  .map((parts) => `/${parts.join("/")}`);

/** A valid form with one character swapped for a look-alike or inserted junk. */
const tampered = fc
  .record({
    base: validPci,
    at: fc.nat(),
    junk: fc.oneof(
      fc.constantFrom(...NOT_WHITESPACE, "０", "：", "．", "а", "١", "İ", "K", "\ud800", "/", "\\"),
      fc.string({ unit: "binary", minLength: 1, maxLength: 2 }),
    ),
    replace: fc.boolean(),
  })
  .map(({ base, at, junk, replace }) => {
    const i = at % (base.length + 1);
    return `${base.slice(0, i)}${junk}${base.slice(replace ? i + 1 : i)}`;
  });

const longPci = fc.oneof(
  { weight: 5, arbitrary: fc.string({ minLength: 250, maxLength: 300 }) },
  {
    weight: 5,
    arbitrary: fc
      .record({ base: validPci, total: fc.integer({ min: 250, max: 262 }) })
      .map(({ base, total }) => base + " ".repeat(Math.max(0, total - base.length))),
  },
  { weight: 1, arbitrary: fc.integer({ min: 1_000, max: 100_000 }).map((n) => "0".repeat(n)) },
  { weight: 1, arbitrary: fc.integer({ min: 10, max: 3_000 }).map((n) => `${SYSFS_PREFIX}${"../".repeat(n)}0000:01:00.0`) },
  { weight: 1, arbitrary: fc.integer({ min: 100, max: 2_000 }).map((n) => `${"/".repeat(n)}sys/bus/pci/devices/0000:01:00.0`) },
);

export const pciArb = fc.oneof(
  { weight: 12, arbitrary: fc.string() },
  { weight: 6, arbitrary: fc.string({ unit: "binary", maxLength: 40 }) },
  { weight: 6, arbitrary: fc.string({ unit: "grapheme", maxLength: 20 }) },
  { weight: 4, arbitrary: fc.string({ unit: "binary-ascii", maxLength: 30 }) },
  { weight: 16, arbitrary: bdfLike },
  { weight: 5, arbitrary: outOfRangeBdf },
  { weight: 14, arbitrary: pathLike },
  { weight: 5, arbitrary: segments },
  { weight: 6, arbitrary: fc.tuple(padding, fc.oneof(bdfLike, pathLike, validPci), padding).map((p) => p.join("")) },
  { weight: 5, arbitrary: tampered },
  { weight: 3, arbitrary: longPci },
  { weight: 5, arbitrary: missingBdf },
  { weight: 2, arbitrary: validPci },
  { weight: 1, arbitrary: refusedPci },
);

export const attachIdArb = fc.oneof(
  { weight: 25, arbitrary: fc.constant("") },
  { weight: 10, arbitrary: fc.constantFrom("gpu0", "gpu1", "nic0", "nvme0", "_vfio0") },
  { weight: 20, arbitrary: fc.stringMatching(/^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$/) },
  { weight: 10, arbitrary: fc.string({ unit: "binary", maxLength: 70 }) },
  { weight: 5, arbitrary: fc.string({ minLength: 63, maxLength: 66 }) },
  {
    weight: 5,
    arbitrary: fc.constantFrom(
      "cocoon-gpu",
      "__x",
      "-a",
      ".a",
      "a/b",
      "../a",
      "a b",
      "a\u0000",
      "gpu0\n",
      " gpu0",
      "ＧＰＵ",
      "a".repeat(64),
      "a".repeat(65),
    ),
  },
);

export const vmRefArb = fc.oneof(
  { weight: 10, arbitrary: fc.string() },
  { weight: 5, arbitrary: fc.string({ unit: "binary", maxLength: 40 }) },
  { weight: 3, arbitrary: fc.constantFrom(...VMS.map((vm) => vm.name), ...VMS.map((vm) => vm.id)) },
  {
    weight: 5,
    arbitrary: fc
      .record({ vm: fc.constantFrom(...VMS), len: fc.integer({ min: 0, max: 14 }) })
      .map(({ vm, len }) => vm.id.slice(0, len)),
  },
  {
    weight: 3,
    arbitrary: fc
      .record({ vm: fc.constantFrom(...VMS), before: padding, after: padding, upper: fc.nat() })
      .map(({ vm, before, after, upper }) => `${before}${randomCase(vm.name, upper)}${after}`),
  },
  { weight: 1, arbitrary: fc.integer({ min: 100, max: 50_000 }).map((n) => "4f1c".repeat(n)) },
  {
    weight: 1,
    arbitrary: fc.constantFrom("", " ", "\t\n", "4f", "4f1", "4f1c", "4f1c2", "7e0", "*", "fuzz-", "fuzz-a ", "FUZZ-A"),
  },
);

export const detachIdArb = fc.oneof(
  { weight: 10, arbitrary: fc.string() },
  { weight: 5, arbitrary: fc.string({ unit: "binary", maxLength: 140 }) },
  { weight: 5, arbitrary: fc.stringMatching(/^[A-Za-z0-9_][A-Za-z0-9_.\/-]{0,70}$/) },
  {
    weight: 2,
    arbitrary: fc.constantFrom(
      "",
      " ",
      "\t",
      "_vfio0",
      "_vfio1",
      "gpu0",
      "x\u0007",
      "x\u0085",
      "x\u200b",
      "a".repeat(128),
      "a".repeat(129),
      "../../etc",
      '"}',
    ),
  },
  { weight: 1, arbitrary: fc.integer({ min: 120, max: 140 }).map((n) => "é".repeat(n)) },
);

// ---- raw protobuf bytes ----

function varint(value: bigint): number[] {
  const out: number[] = [];
  let v = value;
  do {
    let byte = Number(v & 0x7fn);
    v >>= 7n;
    if (v > 0n) byte |= 0x80;
    out.push(byte);
  } while (v > 0n);
  return out;
}

const tag = (field: number, wireType: number) => varint((BigInt(field) << 3n) | BigInt(wireType));

// A lone 0xff, an overlong NUL, a UTF-16 surrogate, a 5-byte form, a cut 3-byte form, a stray continuation, > U+10FFFF.
const INVALID_UTF8 = [
  [0xff],
  [0xc0, 0x80],
  [0xed, 0xa0, 0x80],
  [0xf8, 0x88, 0x80, 0x80, 0x80],
  [0xe2, 0x82],
  [0x80],
  [0xf4, 0x90, 0x80, 0x80],
];

/** Hand-made broken encodings: wrong wire types, truncated varints, huge lengths, bad UTF-8, bad tags, groups. */
const craftedBytes = fc
  .record({
    kind: fc.integer({ min: 0, max: 8 }),
    field: fc.integer({ min: 1, max: 4 }),
    wireType: fc.constantFrom(0, 1, 3, 4, 5, 6, 7),
    n: fc.integer({ min: 1, max: 12 }),
    big: fc.constantFrom(2n ** 31n - 1n, 2n ** 32n, 2n ** 35n, 2n ** 63n, 2n ** 64n - 1n, 4_194_305n, 1_000_000n),
    junk: fc.uint8Array({ maxLength: 12 }),
    utf8: fc.constantFrom(...INVALID_UTF8),
    prefix: fc.constantFrom("", "fuzz-a", "0000:01:00.0", "gpu0"),
  })
  .map(({ kind, field, wireType, n, big, junk, utf8, prefix }) => {
    const ascii = [...Buffer.from(prefix)];
    switch (kind) {
      case 0: // a string field sent with another wire type
        return [...tag(field, wireType), ...junk];
      case 1: // a varint that never ends
        return [...tag(field, wireType === 0 ? 0 : 2), ...Array.from({ length: n }, () => 0xff)];
      case 2: // a length prefix far beyond the message
        return [...tag(field, 2), ...varint(big), ...junk];
      case 3: // a varint longer than 10 bytes
        return [...tag(field, 0), ...Array.from({ length: 10 + n }, () => 0x80), 0x01];
      case 4: {
        // invalid UTF-8 inside a string field
        const body = [...ascii, ...utf8, ...ascii];
        return [...tag(field, 2), ...varint(BigInt(body.length)), ...body];
      }
      case 5: // field number 0, or beyond 2^29-1
        return n % 2 === 0 ? [0x02, 0x01, 0x41] : [...tag(2 ** 29 + n, 2), 0x01, 0x41];
      case 6: // a group that never ends, or an end without a start
        return n % 2 === 0 ? [...tag(field, 3), ...junk] : [...tag(field, 4), ...junk];
      case 7: {
        // a valid field followed by a length cut short
        const body = [...ascii];
        return [...tag(1, 2), ...varint(BigInt(body.length)), ...body, ...tag(field, 2), ...varint(BigInt(n + 40)), ...junk];
      }
      default: {
        // the same field many times, then junk
        const one = [...tag(field, 2), ...varint(BigInt(ascii.length)), ...ascii];
        return [...Array.from({ length: n }, () => one).flat(), ...junk];
      }
    }
  })
  .map((bytes) => Uint8Array.from(bytes));

function mutatedBytes(valid: Uint8Array) {
  return fc
    .record({
      op: fc.integer({ min: 0, max: 4 }),
      at: fc.nat(),
      byte: fc.integer({ min: 0, max: 255 }),
      junk: fc.uint8Array({ minLength: 1, maxLength: 8 }),
    })
    .map(({ op, at, byte, junk }) => {
      const bytes = [...valid];
      const i = at % (bytes.length + 1);
      if (op === 0) return Uint8Array.from(bytes.slice(0, i)); // truncated
      if (op === 1 && i < bytes.length) bytes[i] = byte; // one byte changed
      if (op === 2) bytes.splice(i, 0, ...junk); // junk inserted
      if (op === 3) bytes.push(...junk); // junk appended
      if (op === 4) bytes.splice(i, 0, ...bytes.slice(0, i)); // a prefix repeated
      return Uint8Array.from(bytes);
    });
}

export function rawBytesArb(schema: DescMessage, valid: Record<string, string>) {
  const encoded = toBinary(schema, create(schema, valid));
  return fc.oneof(
    { weight: 4, arbitrary: fc.uint8Array({ maxLength: 64 }) },
    { weight: 4, arbitrary: craftedBytes },
    { weight: 4, arbitrary: mutatedBytes(encoded) },
  );
}

/** One raw call with identity (de)serializers. */
export function rawCall(
  client: grpc.Client,
  method: string,
  bytes: Buffer,
): Promise<{ err: grpc.ServiceError | null; response?: Buffer }> {
  return new Promise((resolve) => {
    client.makeUnaryRequest(
      method,
      (b: Buffer) => b,
      (b: Buffer) => b,
      bytes,
      new grpc.Metadata(),
      {},
      (err, response) => resolve({ err, response }),
    );
  });
}


// ---- the server under test ----

export const show = (text: string) => JSON.stringify(text.length > 80 ? `${text.slice(0, 80)}...(${text.length})` : text);

/** One in-process vfiod (real server, operations, CH backend) with a Cloud Hypervisor double per VM. */
export class FuzzLab {
  readonly doubles = new Map<string, ChDouble>();
  /** Every id a successful Attach returned: the only ids vm.remove-device may ever name. */
  readonly attachedIds = new Set<string>();
  readonly problems: string[] = [];
  readonly figures: string[] = [];

  private constructor(
    readonly dir: string,
    private readonly sysfs: FakeSysfs,
    private server_: TestServer | undefined,
  ) {}

  get server(): TestServer {
    if (this.server_ === undefined) throw new Error("lab not started");
    return this.server_;
  }

  static async start(): Promise<FuzzLab> {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), "vfiod-fuzz-"));
    const sysfs = buildFakeSysfs([
      ...VFIO_DEVICES.map((bdf, i) => ({ bdf, driver: "vfio-pci", group: bdf === "0000:01:00.1" ? 12 : 12 + i })),
      { bdf: RESERVED, driver: "vfio-pci", group: 40 },
      { bdf: "0000:05:00.0", driver: "nvidia", group: 20 },
      { bdf: "0000:06:00.0", driver: "vfio-pci", group: 21 },
      { bdf: "0000:06:00.1", driver: "snd_hda_intel", group: 21 },
      { bdf: "0000:07:00.0", driver: "vfio-pci" },
    ]);
    const lab = new FuzzLab(dir, sysfs, undefined);
    const inventory = [];
    for (const vm of VMS) {
      const socket = path.join(dir, `${vm.name}.sock`);
      const double = await ChDouble.start(socket, { ejectAfterMs: 1, sysfsRoot: sysfs.root });
      double.setState("Running");
      lab.doubles.set(vm.name, double);
      inventory.push({ ...vm, hypervisor: "cloud-hypervisor", socket });
    }
    const inventoryFile = path.join(dir, "inventory.json");
    fs.writeFileSync(inventoryFile, JSON.stringify({ vms: inventory }));
    // A short eject poll keeps thousands of Detach calls quick; nothing else differs from the defaults.
    const backends = new BackendRegistry().register("cloud-hypervisor", new CloudHypervisorBackend({ pollIntervalMs: 5 }));
    lab.server_ = await startTestServer({ inventoryFile, sysfsRoot: sysfs.root, backends });
    return lab;
  }

  async close(title: string): Promise<void> {
    await this.server_?.stop();
    for (const double of this.doubles.values()) await double.close();
    this.sysfs.cleanup();
    fs.rmSync(this.dir, { recursive: true, force: true });
    if (this.figures.length > 0) {
      console.log(`${title} (seed ${SEED}, replay with VFIOD_FUZZ_SEED=${SEED}):\n  ${this.figures.join("\n  ")}`);
    }
  }

  problem(what: string): void {
    if (this.problems.length < 200) this.problems.push(what);
  }

  /** The check every refusal gets: a contract code with a vfiod ErrorInfo reason. */
  checkRefusal(where: string, outcome: Outcome): void {
    if (outcome.key !== "OK" && !isContractRefusal(outcome)) {
      this.problem(`${where}: ${outcome.key} is not a contract refusal (${show(outcome.message)})`);
    }
  }

  requestsTo(endpoint: string): ChRequest[] {
    return [...this.doubles.values()].flatMap((d) => d.requests.filter((r) => r.endpoint === endpoint));
  }

  /** No double holds a device or waits for a guest to eject one. */
  async allDetached(): Promise<boolean> {
    for (const [name, double] of this.doubles) {
      const info = await rawVmInfo(path.join(this.dir, `${name}.sock`));
      if ((info.config.devices ?? []).length > 0 || double.pendingRemovals().length > 0) return false;
    }
    return true;
  }

  /** The end of a suite: health SERVING, checkHypervisorRequests, and a plain valid Attach still works. */
  async finalChecks(): Promise<void> {
    const { server } = this;
    expect(await checkHealth(server.address, "")).toBe("SERVING");
    expect(await checkHealth(server.address, "vfiod.v1.DeviceService")).toBe("SERVING");
    this.checkHypervisorRequests();
    const { device } = await server.client.attach({ vm: "fuzz-c", pci: RESERVED.slice(5).toUpperCase(), id: "final0" });
    expect(device).toMatchObject({ id: "final0", bdf: RESERVED, path: SYSFS_PREFIX + RESERVED });
    expect(this.doubles.get("fuzz-c")!.requests.filter((r) => r.endpoint === "vm.add-device").at(-1)?.body).toEqual({
      path: SYSFS_PREFIX + RESERVED,
      id: "final0",
    });
    expect(this.problems).toEqual([]);
  }

  /**
   * Every vm.add-device body exactly a canonical path of a vfio device (+ a
   * valid id), every vm.remove-device body an id some Attach returned, no other
   * endpoint touched; what is wrong goes to `problems`.
   */
  checkHypervisorRequests(): void {
    const validPaths = new Set([...VFIO_DEVICES, RESERVED].map((bdf) => SYSFS_PREFIX + bdf));
    for (const request of this.requestsTo("vm.add-device")) {
      const body = request.body as Record<string, unknown>;
      const keys = typeof body === "object" && body !== null ? Object.keys(body).sort().join(",") : "";
      const idOk = body.id === undefined || (typeof body.id === "string" && body.id !== "" && callerIdValid(body.id));
      if ((keys !== "path" && keys !== "id,path") || typeof body.path !== "string" || !validPaths.has(body.path) || !idOk) {
        this.problem(`vm.add-device carried ${JSON.stringify(request.body)}`);
      }
    }
    for (const request of this.requestsTo("vm.remove-device")) {
      const body = request.body as Record<string, unknown>;
      if (Object.keys(body ?? {}).join(",") !== "id" || typeof body.id !== "string" || !this.attachedIds.has(body.id)) {
        this.problem(`vm.remove-device carried ${JSON.stringify(request.body)}`);
      }
    }
    for (const double of this.doubles.values()) {
      for (const request of double.requests) {
        if (!["vm.info", "vm.add-device", "vm.remove-device"].includes(request.endpoint)) {
          this.problem(`unexpected request ${request.method} ${request.endpoint}`);
        }
      }
    }
  }
}
