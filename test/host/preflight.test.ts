import { VfiodError } from "../../src/errors";
import { HostPreflight, isVfioDriver } from "../../src/host/preflight";
import { parsePciAddress } from "../../src/pci/address";
import { buildFakeSysfs, type FakeSysfs } from "../support/fake-sysfs";
import { vfiodRejection } from "../support/rejection";

let sysfs: FakeSysfs;
let preflight: HostPreflight;

beforeEach(() => {
  sysfs = buildFakeSysfs([
    { bdf: "0000:01:00.0", driver: "vfio-pci", group: 12 },
    { bdf: "0000:01:00.1", driver: "vfio-pci", group: 12, pciClass: "0x040300" },
    { bdf: "0000:02:00.0", driver: "nvidia", group: 13 },
    { bdf: "0000:03:00.0", group: 14 },
    { bdf: "0000:04:00.0", driver: "vfio-pci", group: 15 },
    { bdf: "0000:04:00.1", driver: "snd_hda_intel", group: 15, pciClass: "0x040300" },
    { bdf: "0000:04:00.2", driver: "xhci_hcd", group: 15, pciClass: "0x0c0330" },
    { bdf: "0000:05:00.0", driver: "mlx5_vfio_pci", group: 16 },
    { bdf: "0000:05:00.1", group: 16 },
    { bdf: "0000:05:00.2", driver: "pcieport", group: 16, pciClass: "0x060400" },
    { bdf: "0000:05:00.3", driver: "pci-stub", group: 16 },
    { bdf: "0000:05:00.4", driver: "shpchp", group: 16, pciClass: "0x060400" },
    { bdf: "0000:06:00.0", driver: "vfio-pci" },
  ]);
  preflight = new HostPreflight(sysfs.root);
});
afterEach(() => sysfs.cleanup());

function refusal(bdf: string): Promise<VfiodError> {
  return vfiodRejection(preflight.check(parsePciAddress(bdf)));
}

test("a vfio-bound device whose group is all vfio passes, and preflight names the group and its members", async () => {
  const group = await preflight.check(parsePciAddress("01:00.0"));
  expect({ number: group.number, members: group.members.map((m) => `${m.bdf}=${m.driver}`) }).toEqual({
    number: "12",
    members: ["0000:01:00.0=vfio-pci", "0000:01:00.1=vfio-pci"],
  });
});

test("before Linux 5.19, a group of vfio variants, unbound, pcieport, pci-stub and bridges on any driver passes", async () => {
  const old = new HostPreflight(sysfs.root, "5.15.0-91-generic");
  await expect(old.check(parsePciAddress("05:00.0"))).resolves.toMatchObject({ number: "16" });
});

test("from Linux 5.19, a bridge in the group keeps it viable only on pcieport, pci-stub or a vfio driver", async () => {
  for (const release of ["5.19.0", "6.1.0-57-amd64", "10.0.0"]) {
    const err = await vfiodRejection(new HostPreflight(sysfs.root, release).check(parsePciAddress("05:00.0")));
    expect({ release, reason: err.reason, offenders: err.meta.offenders }).toEqual({
      release,
      reason: "IOMMU_GROUP_NOT_VIABLE",
      offenders: "0000:05:00.4",
    });
    expect(err.message).toContain("0000:05:00.4 (driver shpchp)");
  }
  sysfs.setDriver("0000:05:00.4", "pcieport");
  await expect(new HostPreflight(sysfs.root, "6.1.0").check(parsePciAddress("05:00.0"))).resolves.toMatchObject({ number: "16" });
});

test("a missing device is DEVICE_NOT_FOUND", async () => {
  const err = await refusal("0000:09:00.0");
  expect(err.reason).toBe("DEVICE_NOT_FOUND");
  expect(err.message).toContain("0000:09:00.0");
});

test("a device on another driver is DEVICE_NOT_VFIO, naming the driver and the bind commands", async () => {
  const err = await refusal("02:00.0");
  expect(err.reason).toBe("DEVICE_NOT_VFIO");
  expect(err.message).toContain("bound to nvidia");
  expect(err.message).toContain("echo vfio-pci > /sys/bus/pci/devices/0000:02:00.0/driver_override");
  expect(err.message).toContain("echo 0000:02:00.0 > /sys/bus/pci/devices/0000:02:00.0/driver/unbind");
  expect(err.meta).toMatchObject({ driver: "nvidia" });
});

test("an unbound device is DEVICE_NOT_VFIO too", async () => {
  const err = await refusal("03:00.0");
  expect(err.reason).toBe("DEVICE_NOT_VFIO");
  expect(err.message).toContain("bound to no driver");
  expect(err.message).not.toContain("unbind");
});

test("a group with host-driver companions is IOMMU_GROUP_NOT_VIABLE, naming each with its driver", async () => {
  const err = await refusal("04:00.0");
  expect(err.reason).toBe("IOMMU_GROUP_NOT_VIABLE");
  expect(err.message).toContain("0000:04:00.1 (driver snd_hda_intel)");
  expect(err.message).toContain("0000:04:00.2 (driver xhci_hcd)");
  expect(err.meta).toMatchObject({ iommu_group: "15", offenders: "0000:04:00.1,0000:04:00.2" });
});

test("the group becomes viable once the companion is rebound", async () => {
  sysfs.setDriver("0000:04:00.1", "vfio-pci");
  sysfs.setDriver("0000:04:00.2", undefined);
  await expect(preflight.check(parsePciAddress("04:00.0"))).resolves.toMatchObject({ number: "15" });
});

test("no iommu_group link (IOMMU off) is refused with how to turn it on", async () => {
  const err = await refusal("06:00.0");
  expect(err.reason).toBe("IOMMU_GROUP_NOT_VIABLE");
  expect(err.message).toContain("IOMMU off or not in a group");
  for (const parameter of ["intel_iommu=on", "amd_iommu=on", "iommu=off"]) expect(err.message).toContain(parameter);
});

test.each([
  ["vfio-pci", true],
  ["mlx5_vfio_pci", true],
  ["xe-vfio-pci", true],
  ["nvgrace_gpu_vfio_pci", true],
  ["vfio", false],
  ["nvidia", false],
  ["vfio-pci-evil", false],
])("isVfioDriver(%j) is %j", (driver, expected) => {
  expect(isVfioDriver(driver)).toBe(expected);
});
