// Turns what a caller typed for a VM into one VmRecord, by cocoon's rules
// (../shared/reference/cocoon.md A.5): exact id, then exact name, then a unique
// id prefix. The tiers run over every source at once, so a ref that two sources
// both claim is refused rather than silently routed to whichever was read first.
import { VfiodError } from "../errors";
import type { VmRecord } from "./vm";

/** cocoon's shortest id prefix: shorter ones would match too much by accident. */
const MIN_PREFIX = 3;

const MAX_SHOWN_REF = 64;
// Keeps an ambiguity message readable when a short prefix hits many ids.
const MAX_LISTED = 10;

function quote(ref: string): string {
  return ref.length > MAX_SHOWN_REF ? `${JSON.stringify(ref.slice(0, MAX_SHOWN_REF))}...` : JSON.stringify(ref);
}

function label(vm: VmRecord): string {
  return `${vm.name} (${vm.id}, ${vm.source})`;
}

function ambiguous(ref: string, matches: readonly VmRecord[]): VfiodError {
  const listed = matches.slice(0, MAX_LISTED).map(label);
  if (matches.length > MAX_LISTED) listed.push(`and ${matches.length - MAX_LISTED} more`);
  return new VfiodError("VM_AMBIGUOUS", `vm ${quote(ref)} is ambiguous: matches ${listed.join(", ")}`);
}

// Only called once the prefix tier found nothing, so an id that starts with ref
// means ref was too short to count as a prefix.
function notFound(ref: string, vms: readonly VmRecord[]): VfiodError {
  const tooShort = vms.some((vm) => vm.idIsName !== true && vm.id.startsWith(ref));
  const hint = tooShort ? ` (an id prefix needs at least ${MIN_PREFIX} characters)` : "";
  return new VfiodError("VM_NOT_FOUND", `vm ${quote(ref)} not found${hint}`);
}

/**
 * The one VM `ref` names among `vms`.
 * @throws VfiodError INVALID_ARGUMENT (empty ref), VM_AMBIGUOUS, VM_NOT_FOUND.
 */
export function resolveVm(ref: string, vms: readonly VmRecord[]): VmRecord {
  if (ref === "") throw new VfiodError("INVALID_ARGUMENT", "vm is required");
  const tiers: readonly (() => VmRecord[])[] = [
    // A VM whose id is its name (the static file's default) is as much matched by
    // name as by id, so another source's VM of that name makes the ref ambiguous.
    () => {
      const byId = vms.filter((vm) => vm.id === ref);
      return byId.some((vm) => vm.name === ref) ? vms.filter((vm) => vm.id === ref || vm.name === ref) : byId;
    },
    () => vms.filter((vm) => vm.name === ref),
    // Only ids a source really has: an id that is just the name is a name.
    () => (ref.length >= MIN_PREFIX ? vms.filter((vm) => vm.idIsName !== true && vm.id.startsWith(ref)) : []),
  ];
  for (const tier of tiers) {
    const [first, ...others] = tier();
    if (first === undefined) continue;
    if (others.length > 0) throw ambiguous(ref, [first, ...others]);
    return first;
  }
  throw notFound(ref, vms);
}
