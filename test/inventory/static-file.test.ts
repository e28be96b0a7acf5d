import { parseInventoryFile } from "../../src/inventory/static-file";

function file(vms: unknown): string {
  return JSON.stringify({ vms });
}

const OK = { name: "vm1", hypervisor: "cloud-hypervisor", socket: "/run/vm1/api.sock" };

describe("parseInventoryFile", () => {
  test("reads each entry; the id defaults to the name; any hypervisor type is kept", () => {
    const { vms, refused } = parseInventoryFile(
      file([OK, { name: "db", id: "db-0001", hypervisor: "qemu", socket: "/run/db/qmp.sock" }, { ...OK, name: "x", hypervisor: "acme-vmm" }]),
    );
    expect(refused).toEqual([]);
    expect(vms).toEqual([
      { id: "vm1", name: "vm1", hypervisor: "cloud-hypervisor", socket: "/run/vm1/api.sock", source: "inventory", idIsName: true },
      { id: "db-0001", name: "db", hypervisor: "qemu", socket: "/run/db/qmp.sock", source: "inventory" },
      { id: "x", name: "x", hypervisor: "acme-vmm", socket: "/run/vm1/api.sock", source: "inventory", idIsName: true },
    ]);
    expect(parseInventoryFile('{"vms": []}')).toEqual({ vms: [], refused: [] });
  });

  test.each<[string, string, RegExp]>([
    ["not JSON", '{"vms": [', /^not JSON: /],
    ["an empty file", "", /^not JSON: /],
    ["a top-level array", "[]", /^must be an object \{"vms": \[\.\.\.\]\}, got array$/],
    ["no vms key", "{}", /^"vms" must be an array, got undefined$/],
    ["vms as an object", '{"vms": {}}', /^"vms" must be an array, got object$/],
    ["an unknown top-level key", '{"vms": [], "vm": []}', /^unknown top-level key "vm"$/],
    ["an entry that is not an object", file([OK, "vm2"]), /^vms\[1\]: must be an object, got string$/],
    ["a missing name", file([{ hypervisor: "qemu", socket: "/s" }]), /^vms\[0\]: missing "name"$/],
    ["a missing hypervisor", file([{ name: "a", socket: "/s" }]), /^vms\[0\]: missing "hypervisor"$/],
    ["a missing socket", file([OK, { name: "a", hypervisor: "qemu" }]), /^vms\[1\]: missing "socket"$/],
    ["a name of the wrong type", file([{ ...OK, name: 7 }]), /^vms\[0\]: "name" must be a string, got number$/],
    ["an id of the wrong type", file([{ ...OK, id: null }]), /^vms\[0\]: "id" must be a string, got null$/],
    ["an empty hypervisor", file([{ ...OK, hypervisor: "" }]), /^vms\[0\]: "hypervisor" must not be empty$/],
    ["a relative socket path", file([{ ...OK, socket: "run/api.sock" }]), /^vms\[0\]: "socket" must be an absolute path, got "run\/api.sock"$/],
    ["an unknown entry key", file([{ ...OK, sockt: "/x" }]), /^vms\[0\]: unknown key "sockt"$/],
    ["a duplicate name", file([OK, { ...OK, id: "other" }]), /^vms\[1\]: duplicate name "vm1" \(also vms\[0\]\)$/],
    ["a duplicate id", file([{ ...OK, id: "a" }, { ...OK, name: "vm2", id: "a" }]), /^vms\[1\]: duplicate id "a" \(also vms\[0\]\)$/],
    ["an explicit id equal to another entry's defaulted id", file([OK, { ...OK, name: "vm2", id: "vm1" }]), /^vms\[1\]: duplicate id "vm1"/],
  ])("refuses %s, saying what and where", (_what, text, message) => {
    expect(() => parseInventoryFile(text)).toThrow(message);
  });
});

describe("hypervisor types vfiod has no backend for", () => {
  const KNOWN = new Set(["cloud-hypervisor", "qemu", "firecracker"]);

  test("an entry naming one (a typo) is refused alone, naming itself; the others are kept", () => {
    const { vms, refused } = parseInventoryFile(
      file([OK, { name: "gpu-node-1", hypervisor: "qmeu", socket: "/run/q.qmp" }, { ...OK, name: "fc", hypervisor: "firecracker" }]),
      KNOWN,
    );
    expect(vms.map((vm) => vm.name)).toEqual(["vm1", "fc"]);
    expect(refused).toEqual([
      'vms[1] "gpu-node-1": unknown hypervisor "qmeu" (vfiod knows cloud-hypervisor, qemu, firecracker)',
    ]);
  });

  test("without a list of known types every type is kept", () => {
    expect(parseInventoryFile(file([{ ...OK, hypervisor: "qmeu" }])).vms).toHaveLength(1);
  });
});
