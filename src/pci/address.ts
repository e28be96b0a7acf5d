// Turns what a caller typed for a host PCI device into one canonical sysfs path,
// or refuses it. Pure: whether the device exists is src/host's question.
//
// Rules start from cocoon's NormalizePath (../shared/reference/cocoon.md A.1) and
// are stricter where it is loose (host-vfio-sysfs.md §2): device number 00-1f
// only, a 5-digit (Intel VMD) domain accepted, and a path must be exactly
// /sys/bus/pci/devices/<full BDF> after cleaning, with no "..".
import { VfiodError } from "../errors";

export const SYSFS_PCI_PREFIX = "/sys/bus/pci/devices/";

/** A host PCI function that passed the input rules. */
export interface PciAddress {
  /** Full lower-case BDF, "0000:01:00.0" (domain 4 or 5 hex digits). */
  readonly bdf: string;
  /** Canonical sysfs path, the only form ever sent to a hypervisor. */
  readonly path: string;
}

// The kernel names a domain "%04x": a fifth digit is never a leading zero, so
// "00000:01:00.0" is no second spelling of 0000:01:00.0.
const FULL_BDF = /^(?:[0-9a-f]{4}|[1-9a-f][0-9a-f]{4}):[0-9a-f]{2}:[01][0-9a-f]\.[0-7]$/;
const SHORT_BDF = /^[0-9a-f]{2}:[01][0-9a-f]\.[0-7]$/;
const MAX_INPUT = 256;

function refuse(input: string, why: string): VfiodError {
  const shown = input.length > 64 ? `${JSON.stringify(input.slice(0, 64))}...` : JSON.stringify(input);
  return new VfiodError("INVALID_ARGUMENT", `pci ${shown} invalid: ${why}`);
}

/** Is `bdf` already a full, canonical BDF ("0000:01:00.0")? */
export function isCanonicalBdf(bdf: string): boolean {
  return FULL_BDF.test(bdf);
}

/** The canonical PciAddress of a full BDF the caller already validated. */
export function addressOfBdf(bdf: string): PciAddress {
  return { bdf, path: SYSFS_PCI_PREFIX + bdf };
}

/**
 * Parses "01:00.0", "0000:01:00.0" or "/sys/bus/pci/devices/0000:01:00.0"
 * (surrounding whitespace trimmed, any case) into a PciAddress.
 * @throws VfiodError INVALID_ARGUMENT for anything else.
 */
export function parsePciAddress(input: string): PciAddress {
  if (input.length > MAX_INPUT) throw refuse(input, `longer than ${MAX_INPUT} characters`);
  const trimmed = input.trim();
  if (trimmed === "") throw new VfiodError("INVALID_ARGUMENT", "pci is required");
  if (trimmed.startsWith("/")) return parseSysfsPath(input, trimmed);
  const lower = trimmed.toLowerCase();
  if (FULL_BDF.test(lower)) return addressOfBdf(lower);
  if (SHORT_BDF.test(lower)) return addressOfBdf(`0000:${lower}`);
  throw refuse(input, "expect BDF (01:00.0 / 0000:01:00.0, device 00-1f, function 0-7) or /sys/bus/pci/devices/<BDF>");
}

function parseSysfsPath(input: string, path: string): PciAddress {
  const segments = path.split("/").filter((s) => s !== "" && s !== ".");
  if (segments.includes("..")) throw refuse(input, 'path must not contain ".."');
  const [sys, bus, pci, devices, bdf, ...rest] = segments;
  if (sys !== "sys" || bus !== "bus" || pci !== "pci" || devices !== "devices" || bdf === undefined || rest.length > 0) {
    throw refuse(input, `absolute path must be ${SYSFS_PCI_PREFIX}<BDF>`);
  }
  const lower = bdf.toLowerCase();
  if (!FULL_BDF.test(lower)) throw refuse(input, "sysfs BDF suffix must match 0000:xx:yy.z");
  return addressOfBdf(lower);
}
