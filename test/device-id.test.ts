import { checkDeviceId, requireDeviceId } from "../src/device-id";
import { VfiodError } from "../src/errors";

function reasonOf(fn: () => unknown): string | undefined {
  try {
    fn();
  } catch (err) {
    return err instanceof VfiodError ? err.reason : "not a VfiodError";
  }
  return undefined;
}

describe("checkDeviceId (cocoon TestSpecNormalizedPath id rules)", () => {
  test.each(["", "gpu0", "a", "GPU_0.x-1", "9lives", "a".repeat(64)])("accepts %j", (id) => {
    expect(checkDeviceId(id)).toBe(id);
  });
  test.each(["cocoon-gpu", "has space", "_vfio2", "-x", ".x", "a".repeat(65), "gpu/0", "é", "gpu\n"])(
    "refuses %j",
    (id) => {
      expect(reasonOf(() => checkDeviceId(id))).toBe("INVALID_ARGUMENT");
    },
  );
});

describe("requireDeviceId (Detach)", () => {
  test("accepts hypervisor-chosen ids outside the caller's rules", () => {
    expect(requireDeviceId("_vfio2")).toBe("_vfio2");
  });
  test.each(["", "a".repeat(129), "gpu\u0000", "x\ny"])("refuses %j", (id) => {
    expect(reasonOf(() => requireDeviceId(id))).toBe("INVALID_ARGUMENT");
  });
});
