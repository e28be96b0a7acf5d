import fc from "fast-check";
import { Code, VfiodError } from "../../src/errors";
import { addressOfBdf, isCanonicalBdf, parsePciAddress, SYSFS_PCI_PREFIX } from "../../src/pci/address";

/** The VfiodError parsePciAddress throws for `input`; anything else (a TypeError, no throw) fails the test. */
function refusal(input: string): VfiodError {
  try {
    parsePciAddress(input);
  } catch (err) {
    if (err instanceof VfiodError) return err;
    throw err;
  }
  throw new Error(`accepted ${JSON.stringify(input)}`);
}

const EXPECT_BDF = "expect BDF (01:00.0 / 0000:01:00.0, device 00-1f, function 0-7) or /sys/bus/pci/devices/<BDF>";

test("the sysfs prefix is the kernel's", () => {
  expect(SYSFS_PCI_PREFIX).toBe("/sys/bus/pci/devices/");
});

describe("parsePciAddress accepts the three forms (cocoon TestNormalizePath)", () => {
  test.each([
    ["short BDF", "01:00.0", "0000:01:00.0"],
    ["full BDF", "0000:01:00.0", "0000:01:00.0"],
    ["uppercase short", "00:1F.7", "0000:00:1f.7"],
    ["uppercase full", "0000:0A:1F.3", "0000:0a:1f.3"],
    ["sysfs path", "/sys/bus/pci/devices/0000:01:00.0", "0000:01:00.0"],
    ["sysfs path with trailing slash", "/sys/bus/pci/devices/0000:01:00.0/", "0000:01:00.0"],
    ["uppercase sysfs suffix", "/sys/bus/pci/devices/0000:0A:1F.3", "0000:0a:1f.3"],
    ["surrounding whitespace", "  0000:01:00.0\n", "0000:01:00.0"],
    ["short BDF with surrounding whitespace", "\t01:00.0 ", "0000:01:00.0"],
    ["sysfs path with surrounding whitespace", " \t/sys/bus/pci/devices/0000:01:00.0\n", "0000:01:00.0"],
    ["doubled slashes are cleaned", "//sys//bus/pci/devices//0000:01:00.0", "0000:01:00.0"],
    ["'.' segments are cleaned", "/sys/./bus/pci/./devices/./0000:01:00.0/.", "0000:01:00.0"],
    ["5-digit VMD domain", "10000:02:05.0", "10000:02:05.0"],
    ["5-digit VMD domain, upper case", "1000A:E1:00.0", "1000a:e1:00.0"],
    ["5-digit VMD domain under sysfs", "/sys/bus/pci/devices/10000:E1:00.0", "10000:e1:00.0"],
    ["highest device and function", "ff:1f.7", "0000:ff:1f.7"],
    ["highest full BDF", "ffff:ff:1f.7", "ffff:ff:1f.7"],
  ])("%s", (_name, input, bdf) => {
    // The expected path is spelled out, not built from SYSFS_PCI_PREFIX.
    expect(parsePciAddress(input)).toEqual({ bdf, path: `/sys/bus/pci/devices/${bdf}` });
  });

  test("an input of exactly 256 characters is still read", () => {
    const input = `${" ".repeat(244)}0000:01:00.0`;
    expect(input).toHaveLength(256);
    expect(parsePciAddress(input).bdf).toBe("0000:01:00.0");
  });
});

describe("parsePciAddress refuses everything else with INVALID_ARGUMENT", () => {
  test.each([
    ["empty", "", "pci is required"],
    ["only whitespace", "   ", "pci is required"],
    ["only a newline", "\n", "pci is required"],
    // Paths: exactly /sys/bus/pci/devices/<full BDF>, nothing before, beside or after it.
    ["/dev/null", "/dev/null", "absolute path must be /sys/bus/pci/devices/<BDF>"],
    ["the root", "/", "absolute path must be"],
    ["the prefix alone", "/sys/bus/pci/devices/", "absolute path must be"],
    ["USB instead of PCI", "/sys/bus/usb/devices/0000:01:00.0", "absolute path must be"],
    ["drivers instead of devices", "/sys/bus/pci/drivers/0000:01:00.0", "absolute path must be"],
    ["another first segment", "/dev/bus/pci/devices/0000:01:00.0", "absolute path must be"],
    ["another bus segment", "/sys/class/pci/devices/0000:01:00.0", "absolute path must be"],
    ["five segments elsewhere", "/a/b/c/d/0000:01:00.0", "absolute path must be"],
    ["four segments, no devices/", "/sys/bus/pci/0000:01:00.0", "absolute path must be"],
    ["a segment too many in front", "/x/sys/bus/pci/devices/0000:01:00.0", "absolute path must be"],
    ["deeper path (six segments)", "/sys/bus/pci/devices/0000:01:00.0/config", "absolute path must be"],
    ["a BDF below a BDF", "/sys/bus/pci/devices/0000:01:00.0/0000:01:00.0", "absolute path must be"],
    ["another sysfs dir", "/sys/devices/pci0000:00/0000:00:01.0", "absolute path must be"],
    ["upper-case directories", "/SYS/BUS/PCI/DEVICES/0000:01:00.0", "absolute path must be"],
    ["garbage suffix under sysfs", "/sys/bus/pci/devices/garbage", "sysfs BDF suffix must match 0000:xx:yy.z"],
    ["short BDF under sysfs", "/sys/bus/pci/devices/01:00.0", "sysfs BDF suffix"],
    ["device 20 under sysfs", "/sys/bus/pci/devices/0000:01:20.0", "sysfs BDF suffix"],
    ["whitespace inside a path", "/sys/bus/pci/devices/ 0000:01:00.0", "sysfs BDF suffix"],
    ["dot-dot escaping sysfs", "/sys/bus/pci/devices/../../../../etc/passwd", 'path must not contain ".."'],
    ["dot-dot back into sysfs", "/sys/bus/pci/devices/../devices/0000:01:00.0", '".."'],
    ["dot-dot at the end", "/sys/bus/pci/devices/0000:01:00.0/..", '".."'],
    // Relative-looking paths are not paths: they must be a BDF, and are not.
    ["relative path", "sys/bus/pci/devices/0000:01:00.0", EXPECT_BDF],
    ["./ path", "./sys/bus/pci/devices/0000:01:00.0", EXPECT_BDF],
    ["../ path", "../sys/bus/pci/devices/0000:01:00.0", EXPECT_BDF],
    ["~/ path", "~/0000:01:00.0", EXPECT_BDF],
    // BDFs.
    ["garbage", "not-a-bdf", EXPECT_BDF],
    ["function digit 8", "01:00.8", EXPECT_BDF],
    ["device number 20 (PCI allows 00-1f)", "01:20.0", EXPECT_BDF],
    ["device number 2f", "01:2f.0", EXPECT_BDF],
    ["device number ff", "0000:01:ff.0", EXPECT_BDF],
    ["device number 20, full", "0000:01:20.0", EXPECT_BDF],
    ["one-digit bus", "1:00.0", EXPECT_BDF],
    ["one-digit device", "01:0.0", EXPECT_BDF],
    ["3-digit domain", "000:01:00.0", EXPECT_BDF],
    ["6-digit domain", "100000:01:00.0", EXPECT_BDF],
    ["5-digit domain with a leading zero (the kernel writes %04x)", "00000:01:00.0", EXPECT_BDF],
    ["5-digit domain with a leading zero, under sysfs", "/sys/bus/pci/devices/0ffff:01:00.0", "sysfs BDF suffix"],
    ["no function", "0000:01:00", EXPECT_BDF],
    ["two function digits, short", "01:00.07", EXPECT_BDF],
    ["two function digits, full", "0000:01:00.07", EXPECT_BDF],
    ["a character before a full BDF", "x0000:01:00.0", EXPECT_BDF],
    ["a character before a short BDF", "x01:00.0", EXPECT_BDF],
    ["a character after a short BDF", "01:00.0x", EXPECT_BDF],
    ["non-hex domain", "g000:01:00.0", EXPECT_BDF],
    ["inner whitespace", "0000:01: 00.0", EXPECT_BDF],
    ["NUL byte", "0000:01:00.0\u0000", EXPECT_BDF],
    ["two BDFs", "01:00.0 02:00.0", EXPECT_BDF],
    ["too long", "0".repeat(300), "longer than 256 characters"],
    ["257 characters, even if mostly whitespace", `${" ".repeat(245)}0000:01:00.0`, "longer than 256 characters"],
  ])("%s", (_name, input, message) => {
    const err = refusal(input);
    expect(err.reason).toBe("INVALID_ARGUMENT");
    expect(err.code).toBe(Code.INVALID_ARGUMENT);
    expect(err.message).toContain(message);
  });

  test("the message quotes the input as typed", () => {
    expect(refusal(" not-a-bdf ").message).toBe(`pci " not-a-bdf " invalid: ${EXPECT_BDF}`);
    expect(refusal("/sys/bus/usb/devices/0000:01:00.0").message).toBe(
      'pci "/sys/bus/usb/devices/0000:01:00.0" invalid: absolute path must be /sys/bus/pci/devices/<BDF>',
    );
    expect(refusal("/sys/bus/pci/devices/0000:01:20.0").message).toBe(
      'pci "/sys/bus/pci/devices/0000:01:20.0" invalid: sysfs BDF suffix must match 0000:xx:yy.z',
    );
    expect(refusal("/sys/bus/pci/devices/..").message).toBe('pci "/sys/bus/pci/devices/.." invalid: path must not contain ".."');
    expect(refusal("").message).toBe("pci is required");
  });

  test("the message quotes at most 64 characters of a long input", () => {
    expect(refusal("x".repeat(64)).message).toBe(`pci "${"x".repeat(64)}" invalid: ${EXPECT_BDF}`);
    expect(refusal("x".repeat(65)).message).toBe(`pci "${"x".repeat(64)}"... invalid: ${EXPECT_BDF}`);
    expect(refusal("x".repeat(257)).message).toBe(`pci "${"x".repeat(64)}"... invalid: longer than 256 characters`);
  });
});

describe("isCanonicalBdf and addressOfBdf", () => {
  test.each(["0000:01:00.0", "ffff:ff:1f.7", "10000:e1:00.0"])("%j is canonical", (bdf) => {
    expect(isCanonicalBdf(bdf)).toBe(true);
  });
  test.each(["01:00.0", "0000:0A:00.0", " 0000:01:00.0", "0000:01:20.0", "/sys/bus/pci/devices/0000:01:00.0", ""])(
    "%j is not",
    (bdf) => {
      expect(isCanonicalBdf(bdf)).toBe(false);
    },
  );
  test("addressOfBdf puts the BDF under the sysfs prefix", () => {
    expect(addressOfBdf("0000:01:00.0")).toEqual({ bdf: "0000:01:00.0", path: "/sys/bus/pci/devices/0000:01:00.0" });
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
        // Strictly true: fast-check passes a property that returns undefined.
        return (
          isCanonicalBdf(address.bdf) === true &&
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
