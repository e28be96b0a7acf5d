import { Code, VfiodError } from "../../src/errors";
import { resolveVm } from "../../src/inventory/resolve";
import type { VmRecord, VmSource } from "../../src/inventory/vm";

function vm(name: string, id: string, source: VmSource = "inventory"): VmRecord {
  return { id, name, hypervisor: "cloud-hypervisor", socket: `/run/${id}/api.sock`, source };
}

function failure(ref: string, vms: readonly VmRecord[]): VfiodError {
  try {
    resolveVm(ref, vms);
  } catch (err) {
    if (err instanceof VfiodError) return err;
    throw err;
  }
  throw new Error(`resolveVm(${JSON.stringify(ref)}) did not throw`);
}

const GPU = vm("gpu-vm", "K7Q2MZ4XW3ABCDEFGHJ2345677", "cocoon");
const IDLE = vm("idle-vm", "K7QAAAAAAAAAAAAAAAAAAAAAAA", "cocoon");
const WEB = vm("web", "web");
const VMS = [WEB, GPU, IDLE];

describe("resolveVm", () => {
  test("finds a VM by exact id, by name, and by unique id prefix", () => {
    expect(resolveVm("K7Q2MZ4XW3ABCDEFGHJ2345677", VMS)).toBe(GPU);
    expect(resolveVm("idle-vm", VMS)).toBe(IDLE);
    expect(resolveVm("K7Q2MZ", VMS)).toBe(GPU);
    expect(resolveVm("K7QA", VMS)).toBe(IDLE);
  });

  test("an exact id wins over another VM's name, and a name over an id prefix", () => {
    const named = vm("ABCDEF", "one");
    const ided = vm("two", "ABCDEF");
    expect(resolveVm("ABCDEF", [named, ided])).toBe(ided);
    const prefixed = vm("three", "ABCDEFGH");
    expect(resolveVm("ABCDEF", [prefixed, named])).toBe(named);
  });

  test("an id prefix matching several VMs is ambiguous and lists each match", () => {
    const err = failure("K7Q", VMS);
    expect(err.reason).toBe("VM_AMBIGUOUS");
    expect(err.code).toBe(Code.FAILED_PRECONDITION);
    expect(err.message).toBe(
      'vm "K7Q" is ambiguous: matches gpu-vm (K7Q2MZ4XW3ABCDEFGHJ2345677, cocoon), idle-vm (K7QAAAAAAAAAAAAAAAAAAAAAAA, cocoon)',
    );
  });

  test("a prefix shorter than 3 characters matches nothing, and says why", () => {
    const err = failure("K7", VMS);
    expect(err.reason).toBe("VM_NOT_FOUND");
    expect(err.code).toBe(Code.NOT_FOUND);
    expect(err.message).toBe('vm "K7" not found (an id prefix needs at least 3 characters)');
  });

  test("a short ref gets the hint only when an id starts with it", () => {
    expect(failure("K", VMS).message).toBe('vm "K" not found (an id prefix needs at least 3 characters)');
    const err = failure("zz", VMS);
    expect(err.reason).toBe("VM_NOT_FOUND");
    expect(err.message).toBe('vm "zz" not found');
    // "gp" starts a name, not an id.
    expect(failure("gp", VMS).message).toBe('vm "gp" not found');
  });

  test("names are never prefix-matched", () => {
    expect(failure("gpu", VMS).message).toBe('vm "gpu" not found');
  });

  test("an id that is only the name (a static entry without an id) is never prefix-matched", () => {
    const node = { ...vm("gpu-node-1", "gpu-node-1"), idIsName: true as const };
    const err = failure("gpu", [node]);
    expect(err.reason).toBe("VM_NOT_FOUND");
    expect(err.code).toBe(Code.NOT_FOUND);
    expect(err.message).toBe('vm "gpu" not found');
    expect(failure("gpu-node", [node]).reason).toBe("VM_NOT_FOUND");
    // Nor does a short ref get the "too short" hint from it: it is a name.
    expect(failure("gp", [node]).message).toBe('vm "gp" not found');
    expect(resolveVm("gpu-node-1", [node])).toBe(node);
    // The same string as a real id is still a prefix.
    expect(resolveVm("gpu-node", [vm("other", "gpu-node-1")]).name).toBe("other");
  });

  test("the same name in two sources is ambiguous, also when one VM's id is its name", () => {
    const err = failure("gpu-vm", [vm("gpu-vm", "gpu-vm", "inventory"), GPU]);
    expect(err.reason).toBe("VM_AMBIGUOUS");
    expect(err.message).toBe(
      'vm "gpu-vm" is ambiguous: matches gpu-vm (gpu-vm, inventory), gpu-vm (K7Q2MZ4XW3ABCDEFGHJ2345677, cocoon)',
    );
    expect(failure("gpu-vm", [vm("gpu-vm", "gpu-0001", "inventory"), GPU]).reason).toBe("VM_AMBIGUOUS");
  });

  test("a VM whose id is its name is found by it among other VMs", () => {
    expect(resolveVm("web", VMS)).toBe(WEB);
    expect(resolveVm("web", [GPU, WEB, IDLE])).toBe(WEB);
  });

  test("an exact id that is also a name brings in every VM of that name, and only those", () => {
    const a = vm("x-vm", "x-vm", "inventory");
    const b = vm("b", "x-vm", "cocoon");
    const c = vm("x-vm", "c-id", "cocoon");
    expect(failure("x-vm", [a, b, c, GPU]).message).toBe(
      'vm "x-vm" is ambiguous: matches x-vm (x-vm, inventory), b (x-vm, cocoon), x-vm (c-id, cocoon)',
    );
  });

  test("an exact id in one source wins over a name in another", () => {
    const fixed = vm("web", "gpu-vm", "inventory");
    expect(resolveVm("gpu-vm", [GPU, fixed])).toBe(fixed);
  });

  test("the same id in two sources is ambiguous", () => {
    const err = failure("web", [WEB, vm("other", "web", "cocoon")]);
    expect(err.reason).toBe("VM_AMBIGUOUS");
    expect(err.message).toBe('vm "web" is ambiguous: matches web (web, inventory), other (web, cocoon)');
  });

  test("a long list of matches is cut short after 10", () => {
    const many = Array.from({ length: 13 }, (_, i) => vm(`n${i}`, `vm-${i}`));
    const listed = (n: number) => many.slice(0, n).map((v) => `${v.name} (${v.id}, inventory)`).join(", ");
    const err = failure("vm-", many);
    expect(err.reason).toBe("VM_AMBIGUOUS");
    expect(err.message).toBe(`vm "vm-" is ambiguous: matches ${listed(10)}, and 3 more`);
    expect(failure("vm-", many.slice(0, 11)).message).toBe(`vm "vm-" is ambiguous: matches ${listed(10)}, and 1 more`);
    expect(failure("vm-", many.slice(0, 10)).message).toBe(`vm "vm-" is ambiguous: matches ${listed(10)}`);
  });

  test("an empty ref is an invalid argument", () => {
    const err = failure("", VMS);
    expect(err.reason).toBe("INVALID_ARGUMENT");
    expect(err.code).toBe(Code.INVALID_ARGUMENT);
    expect(err.message).toBe("vm is required");
  });

  test("an unknown ref is quoted, and truncated when long", () => {
    expect(failure('no"pe', VMS).message).toBe('vm "no\\"pe" not found');
    const long = "x".repeat(500);
    expect(failure(long, VMS).message).toBe(`vm "${"x".repeat(64)}"... not found`);
    expect(failure("x".repeat(65), VMS).message).toBe(`vm "${"x".repeat(64)}"... not found`);
    expect(failure("x".repeat(64), VMS).message).toBe(`vm "${"x".repeat(64)}" not found`);
    expect(failure("anything", []).reason).toBe("VM_NOT_FOUND");
  });
});
