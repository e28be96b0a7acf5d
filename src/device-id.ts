// The rules for a caller-chosen device id (cocoon.md A.1, contract.md).
import { VfiodError } from "./errors";

const DEVICE_ID = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$/;
/** cocoon reserves ids with this prefix for its own devices. */
const RESERVED_PREFIX = "cocoon-";

/**
 * Checks an optional device id; "" means "let the backend choose".
 * @throws VfiodError INVALID_ARGUMENT when the id breaks the rules.
 */
export function checkDeviceId(id: string): string {
  if (id === "") return id;
  if (!DEVICE_ID.test(id) || id.startsWith(RESERVED_PREFIX)) {
    const shown = id.length > 80 ? `${JSON.stringify(id.slice(0, 80))}...` : JSON.stringify(id);
    throw new VfiodError(
      "INVALID_ARGUMENT",
      `id ${shown} invalid: must match [A-Za-z0-9][A-Za-z0-9_.-]{0,63} and not start with ${RESERVED_PREFIX}`,
    );
  }
  return id;
}

const MAX_EXISTING_ID = 128;

/**
 * Checks the id of a device that is already attached (Detach). Looser than
 * checkDeviceId: hypervisors choose ids outside the caller's rules (Cloud
 * Hypervisor's "_vfio2"), and those must stay removable.
 */
export function requireDeviceId(id: string): string {
  if (id === "") throw new VfiodError("INVALID_ARGUMENT", "id is required");
  // Format characters and line separators would let an id reorder or split the
  // log and audit lines it is written into ("gpu\u202E0" shows as "gpu" + reversed text).
  if (id.length > MAX_EXISTING_ID || /[\p{Cc}\p{Cf}\p{Zl}\p{Zp}]/u.test(id)) {
    throw new VfiodError("INVALID_ARGUMENT", `id invalid: at most ${MAX_EXISTING_ID} printable characters`);
  }
  return id;
}

/**
 * The id of a companion attached with a primary by a whole-group Attach: the
 * primary's id, "-", and the companion's BDF without its domain, with ":" and "."
 * as "-": ("gpu0", "0000:01:00.1") -> "gpu0-01-00-1". A whole-group Detach of the
 * primary finds its companions by this rule, so vfiod keeps no record of them.
 */
export function companionId(primaryId: string, bdf: string): string {
  return `${primaryId}-${bdf.slice(bdf.indexOf(":") + 1).replace(/[:.]/g, "-")}`;
}
