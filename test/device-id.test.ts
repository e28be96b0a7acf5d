import { checkDeviceId, companionId, requireDeviceId } from "../src/device-id";
import { Code, VfiodError } from "../src/errors";

/** The VfiodError `fn` throws; anything else (a TypeError, no throw) fails the test. */
function refusal(fn: () => unknown): VfiodError {
  try {
    fn();
  } catch (err) {
    if (err instanceof VfiodError) return err;
    throw err;
  }
  throw new Error("accepted");
}

const RULES = "must match [A-Za-z0-9][A-Za-z0-9_.-]{0,63} and not start with cocoon-";

describe("checkDeviceId (cocoon TestSpecNormalizedPath id rules)", () => {
  test.each(["", "gpu0", "a", "GPU_0.x-1", "9lives", "a".repeat(64), "gpu-cocoon-", "cocoon", "Z.-_"])("accepts %j", (id) => {
    expect(checkDeviceId(id)).toBe(id);
  });
  test.each([
    "cocoon-gpu",
    "cocoon-",
    "has space",
    " gpu0",
    "gpu0 ",
    "_vfio2",
    "-x",
    ".x",
    "a".repeat(65),
    "gpu/0",
    "é",
    "gpu\n",
    "gpu\u0000",
  ])("refuses %j with INVALID_ARGUMENT", (id) => {
    const err = refusal(() => checkDeviceId(id));
    expect(err.reason).toBe("INVALID_ARGUMENT");
    expect(err.code).toBe(Code.INVALID_ARGUMENT);
    expect(err.message).toBe(`id ${JSON.stringify(id)} invalid: ${RULES}`);
  });
  test("the message quotes at most 80 characters of a long id", () => {
    expect(refusal(() => checkDeviceId("a".repeat(80))).message).toBe(`id "${"a".repeat(80)}" invalid: ${RULES}`);
    expect(refusal(() => checkDeviceId("a".repeat(81))).message).toBe(`id "${"a".repeat(80)}"... invalid: ${RULES}`);
  });
});

describe("requireDeviceId (Detach)", () => {
  test.each(["_vfio2", "cocoon-gpu", "has space", "é", "a".repeat(128)])("accepts %j, an id a hypervisor may choose", (id) => {
    expect(requireDeviceId(id)).toBe(id);
  });
  test("refuses an empty id", () => {
    const err = refusal(() => requireDeviceId(""));
    expect(err.reason).toBe("INVALID_ARGUMENT");
    expect(err.code).toBe(Code.INVALID_ARGUMENT);
    expect(err.message).toBe("id is required");
  });
  test.each(["a".repeat(129), "gpu\u0000", "x\ny", "\u007f", "tab\there", "gpu\u202e0", "x\u2028y", "x\u2029y", "zero\u200bwidth"])(
    "refuses %j",
    (id) => {
    const err = refusal(() => requireDeviceId(id));
    expect(err.reason).toBe("INVALID_ARGUMENT");
    expect(err.code).toBe(Code.INVALID_ARGUMENT);
    expect(err.message).toBe("id invalid: at most 128 printable characters");
    },
  );
});

describe("companionId (whole-group Attach)", () => {
  test.each([
    ["gpu0", "0000:01:00.1", "gpu0-01-00-1"],
    ["gpu0", "10000:e1:1f.7", "gpu0-e1-1f-7"],
    ["a.b", "0000:00:14.1", "a.b-00-14-1"],
  ])("%j with %j is %j", (primary, bdf, id) => {
    expect(companionId(primary, bdf)).toBe(id);
  });
});

