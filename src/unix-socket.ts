// Resolves --socket-group: a numeric gid, or a name looked up in /etc/group
// (Node has no getgrnam).
import fs from "node:fs";

export function groupId(group: string, groupFile = "/etc/group"): number {
  if (/^\d+$/.test(group)) return Number(group);
  for (const line of fs.readFileSync(groupFile, "utf8").split("\n")) {
    const [name, , gid] = line.split(":");
    if (name === group && gid !== undefined && /^\d+$/.test(gid)) return Number(gid);
  }
  throw new Error(`--socket-group: no group named ${JSON.stringify(group)} in ${groupFile}`);
}
