// The --inventory file (../shared/contract.md): VMs an operator lists by hand,
// {"vms":[{"name","id"?,"hypervisor","socket"}]}. Strict on purpose: a typo must
// not quietly drop a VM or send a device to the wrong socket, so any fault
// rejects the whole file and the error names the entry.
import path from "node:path";
import type { VmRecord } from "./vm";
import { isJsonObject, type JsonObject } from "../json";

const ENTRY_KEYS = new Set(["name", "id", "hypervisor", "socket"]);

function typeName(value: unknown): string {
  return value === null ? "null" : Array.isArray(value) ? "array" : typeof value;
}

function nonEmptyString(entry: JsonObject, key: string, where: string): string {
  const value = entry[key];
  if (value === undefined) throw new Error(`${where}: missing "${key}"`);
  if (typeof value !== "string") throw new Error(`${where}: "${key}" must be a string, got ${typeName(value)}`);
  if (value === "") throw new Error(`${where}: "${key}" must not be empty`);
  return value;
}

function parseEntry(entry: unknown, where: string): VmRecord {
  if (!isJsonObject(entry)) throw new Error(`${where}: must be an object, got ${typeName(entry)}`);
  const unknown = Object.keys(entry).find((key) => !ENTRY_KEYS.has(key));
  if (unknown !== undefined) throw new Error(`${where}: unknown key ${JSON.stringify(unknown)}`);
  const name = nonEmptyString(entry, "name", where);
  const idIsName = entry.id === undefined;
  const id = idIsName ? name : nonEmptyString(entry, "id", where);
  const hypervisor = nonEmptyString(entry, "hypervisor", where);
  const socket = nonEmptyString(entry, "socket", where);
  if (!path.isAbsolute(socket)) throw new Error(`${where}: "socket" must be an absolute path, got ${JSON.stringify(socket)}`);
  return { id, name, hypervisor, socket, source: "inventory", ...(idIsName ? { idIsName: true } : {}) };
}

/** What a static inventory file holds: its VMs, and the entries refused one by one. */
export interface InventoryFileContents {
  readonly vms: VmRecord[];
  /** Entries left out, each naming itself and why (`vms[2] "gpu-1": unknown hypervisor "qmeu"`). */
  readonly refused: string[];
}

/**
 * The VMs a static inventory file lists (id defaults to the name). An entry
 * naming a hypervisor type vfiod has no backend for (a typo) is refused alone;
 * anything else wrong refuses the whole file.
 * @param hypervisors the types vfiod has a backend for; undefined accepts any.
 * @throws Error saying what is wrong and where (`vms[2]: missing "socket"`).
 */
export function parseInventoryFile(text: string, hypervisors?: ReadonlySet<string>): InventoryFileContents {
  let doc: unknown;
  try {
    doc = JSON.parse(text);
  } catch (err) {
    throw new Error(`not JSON: ${(err as Error).message}`);
  }
  if (!isJsonObject(doc)) throw new Error(`must be an object {"vms": [...]}, got ${typeName(doc)}`);
  const unknown = Object.keys(doc).find((key) => key !== "vms");
  if (unknown !== undefined) throw new Error(`unknown top-level key ${JSON.stringify(unknown)}`);
  if (!Array.isArray(doc.vms)) throw new Error(`"vms" must be an array, got ${typeName(doc.vms)}`);

  const byName = new Map<string, number>();
  const byId = new Map<string, number>();
  const vms: VmRecord[] = [];
  const refused: string[] = [];
  doc.vms.forEach((entry: unknown, index: number) => {
    const where = `vms[${index}]`;
    const vm = parseEntry(entry, where);
    const sameName = byName.get(vm.name);
    if (sameName !== undefined) throw new Error(`${where}: duplicate name ${JSON.stringify(vm.name)} (also vms[${sameName}])`);
    const sameId = byId.get(vm.id);
    if (sameId !== undefined) throw new Error(`${where}: duplicate id ${JSON.stringify(vm.id)} (also vms[${sameId}])`);
    byName.set(vm.name, index);
    byId.set(vm.id, index);
    if (hypervisors === undefined || hypervisors.has(vm.hypervisor)) {
      vms.push(vm);
      return;
    }
    const known = [...hypervisors].join(", ");
    refused.push(`${where} ${JSON.stringify(vm.name)}: unknown hypervisor ${JSON.stringify(vm.hypervisor)} (vfiod knows ${known})`);
  });
  return { vms, refused };
}
