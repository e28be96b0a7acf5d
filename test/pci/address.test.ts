import fc from "fast-check";
import { VfiodError } from "../../src/errors";
import { addressOfBdf, isCanonicalBdf, parsePciAddress, SYSFS_PCI_PREFIX } from "../../src/pci/address";

function refusal(input: string): VfiodError {
  try {
    parsePciAddress(input);
  } catch (err) {
    if (err instanceof VfiodError) return err;
    throw err;
  }
  throw new Error(`accepted ${JSON.stringify(input)}`);
}

describe("parsePciAddress accepts the three forms (cocoon TestNormalizePath)", () => {
  test.each([
    ["short BDF", "01:00.0", "0000:01:00.0"],
    ["full BDF", "0000:01:00.0", "0000:01:00.0"],
    ["uppercase short", "00:1F.7", "0000:00:1f.7"],
    ["sysfs path", "/sys/bus/pci/devices/0000:01:00.0", "0000:01:00.0"],
    ["sysfs path with trailing slash", "/sys/bus/pci/devices/0000:01:00.0/", "0000:01:00.0"],
    ["uppercase sysfs suffix", "/sys/bus/pci/devices/0000:0A:1F.3", "0000:0a:1f.3"],
    ["surrounding whitespace", "  0000:01:00.0\n", "0000:01:00.0"],
    ["doubled slashes are cleaned", "//sys//bus/pci/devices//0000:01:00.0", "0000:01:00.0"],
    ["5-digit VMD domain", "10000:02:05.0", "10000:02:05.0"],
    ["highest device and function", "ff:1f.7", "0000:ff:1f.7"],
  ])("%s", (_name, input, bdf) => {
    expect(parsePciAddress(input)).toEqual({ bdf, path: `${SYSFS_PCI_PREFIX}${bdf}` });
  });
});

describe("parsePciAddress refuses everything else with INVALID_ARGUMENT", () => {
  test.each([
    ["empty", "", "pci is required"],
    ["only whitespace", "   ", "pci is required"],
    ["/dev/null", "/dev/null", "absolute path must be"],
    ["garbage suffix under sysfs", "/sys/bus/pci/devices/garbage", "sysfs BDF suffix"],
    ["short BDF under sysfs", "/sys/bus/pci/devices/01:00.0", "sysfs BDF suffix"],
    ["garbage", "not-a-bdf", "expect BDF"],
    ["function digit 8", "01:00.8", "expect BDF"],
    ["device number 20 (PCI allows 00-1f)", "01:20.0", "expect BDF"],
    ["device number ff", "0000:01:ff.0", "expect BDF"],
    ["one-digit bus", "1:00.0", "expect BDF"],
    ["6-digit domain", "100000:01:00.0", "expect BDF"],
    ["dot-dot escaping sysfs", "/sys/bus/pci/devices/../../../../etc/passwd", '".."'],
    ["dot-dot back into sysfs", "/sys/bus/pci/devices/../devices/0000:01:00.0", '".."'],
    ["deeper path", "/sys/bus/pci/devices/0000:01:00.0/config", "absolute path must be"],
    ["another sysfs dir", "/sys/devices/pci0000:00/0000:00:01.0", "absolute path must be"],
    ["the prefix alone", "/sys/bus/pci/devices/", "absolute path must be"],
    ["relative path", "sys/bus/pci/devices/0000:01:00.0", "expect BDF"],
    ["inner whitespace", "0000:01: 00.0", "expect BDF"],
    ["NUL byte", "0000:01:00.0\u0000", "expect BDF"],
    ["too long", "0".repeat(300), "longer than"],
  ])("%s", (_name, input, message) => {
    const err = refusal(input);
    expect(err.reason).toBe("INVALID_ARGUMENT");
    expect(err.message).toContain(message);
  });

  test("the message quotes at most 64 characters of a long input", () => {
    expect(refusal(`${"x".repeat(200)}`).message.length).toBeLessThan(200);
  });
});

describe("property: every output is a refusal or a canonical path that round-trips", () => {
  const hex = (min: number, max: number) => fc.integer({ min, max }).map((n) => n.toString(16));
  const bdfLike = fc
    .tuple(
      fc.option(hex(0, 0xfffff), { nil: undefined }),
      hex(0, 0x1ff),
      hex(0, 0x3f),
      fc.integer({ min: 0, max: 9 }),
      fc.boolean(),
    )
    .map(([domain, bus, dev, fn, upper]) => {
      const text = `${domain === undefined ? "" : `${domain.padStart(4, "0")}:`}${bus.padStart(2, "0")}:${dev.padStart(2, "0")}.${fn}`;
      return upper ? text.toUpperCase() : text;
    });
  const pathLike = fc
    .tuple(fc.array(fc.constantFrom("sys", "bus", "pci", "devices", "..", ".", "", "etc"), { maxLength: 6 }), bdfLike)
    .map(([segments, bdf]) => `/${[...segments, bdf].join("/")}`);
  const anyInput = fc.oneof(bdfLike, pathLike, fc.string(), fc.string({ unit: "binary" }));

  test("parse(x) is a refusal or a canonical address; parsing its path gives it back", () => {
    fc.assert(
      fc.property(anyInput, (input) => {
        let address;
        try {
          address = parsePciAddress(input);
        } catch (err) {
          return err instanceof VfiodError && err.reason === "INVALID_ARGUMENT";
        }
        return (
          isCanonicalBdf(address.bdf) &&
          address.path === SYSFS_PCI_PREFIX + address.bdf &&
          !address.path.includes("..") &&
          JSON.stringify(parsePciAddress(address.path)) === JSON.stringify(address) &&
          JSON.stringify(parsePciAddress(address.bdf)) === JSON.stringify(address)
        );
      }),
      { numRuns: 20000 },
    );
  });

  test("every valid BDF is accepted in all three forms, as one address", () => {
    const valid = fc
      .tuple(hex(0, 0xffff), hex(0, 0xff), hex(0, 0x1f), fc.integer({ min: 0, max: 7 }))
      .map(([d, b, s, f]) => `${d.padStart(4, "0")}:${b.padStart(2, "0")}:${s.padStart(2, "0")}.${f}`);
    fc.assert(
      fc.property(valid, (bdf) => {
        const expected = addressOfBdf(bdf);
        const forms = [bdf, `${SYSFS_PCI_PREFIX}${bdf.toUpperCase()}`];
        if (bdf.startsWith("0000:")) forms.push(bdf.slice(5));
        return forms.every((form) => JSON.stringify(parsePciAddress(form)) === JSON.stringify(expected));
      }),
      { numRuns: 5000 },
    );
  });
});
