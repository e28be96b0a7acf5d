// Choosing a vfio-pci variant driver from modules.alias, as libvirt's
// virPCIDeviceFindBestVFIOVariant does: field-by-field match with "*" wildcards,
// the fewest wildcards wins, the first of equals.
import { bestVariant, parseModalias } from "../../src/host/vfio-driver";

const MLX_VF = "pci:v000015B3d0000101Esv000015B3sd00000042bc02sc00i00\n";
const ALIASES = [
  "# Aliases extracted from modules themselves.",
  "alias pci:v000015B3d0000101Esv*sd*bc*sc*i* mlx5_core",
  "alias vfio_pci:v000015B3d*sv*sd*bc*sc*i* any_mellanox_vfio_pci",
  "alias vfio_pci:v000015B3d0000101Esv*sd*bc*sc*i* mlx5_vfio_pci",
  "alias vfio_pci:v000015B3d0000101Esv*sd*bc02sc*i* first_of_two_vfio_pci",
  "alias vfio_pci:v000015B3d0000101Esv*sd*bc*sc00i* second_of_two_vfio_pci",
  "alias vfio_pci:v000010DEd*sv*sd*bc03sc*i* nvgrace_gpu_vfio_pci",
].join("\n");

test("the device's modalias splits into its seven fields", () => {
  expect(parseModalias("v000015B3d0000101Esv000015B3sd00000042bc02sc00i00")).toEqual([
    "000015B3",
    "0000101E",
    "000015B3",
    "00000042",
    "02",
    "00",
    "00",
  ]);
  expect(parseModalias("v*d*sv*sd*bc03sc*i*")).toEqual(["*", "*", "*", "*", "03", "*", "*"]);
  expect(parseModalias("garbage")).toBeUndefined();
});

test("the match with the fewest wildcards wins; of equals, the first in the file", () => {
  expect(bestVariant(ALIASES, MLX_VF)).toBe("first_of_two_vfio_pci");
  expect(bestVariant(ALIASES.replace(/^alias vfio_pci:\S+bc02\S+ first_of_two_vfio_pci$/m, ""), MLX_VF)).toBe("second_of_two_vfio_pci");
});

test("only vfio_pci: aliases count, and only matching ones", () => {
  expect(bestVariant("alias pci:v000015B3d0000101Esv*sd*bc*sc*i* mlx5_core", MLX_VF)).toBeUndefined();
  expect(bestVariant(ALIASES, "pci:v00008086d000010D3sv00008086sd0000A01Fbc02sc00i00")).toBeUndefined();
  expect(bestVariant(ALIASES, "pci:v000010DEd00002204sv00001458sd00004034bc03sc00i00")).toBe("nvgrace_gpu_vfio_pci");
});

test("a device whose modalias cannot be read or parsed gets no variant", () => {
  expect(bestVariant(ALIASES, "")).toBeUndefined();
  expect(bestVariant(ALIASES, "platform:foo")).toBeUndefined();
  expect(bestVariant("alias vfio_pci:broken mlx5_vfio_pci\nalias vfio_pci:", MLX_VF)).toBeUndefined();
});
