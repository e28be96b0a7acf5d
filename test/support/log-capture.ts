// A logger whose JSON lines a test can read back: what vfiod would have written to stderr;
// and the lines of an --audit-log file.
import fs from "node:fs";
import pino from "pino";
import type { AuditEntry } from "../../src/audit";
import type { Logger } from "../../src/log";

export type LogLine = Record<string, unknown> & { level: number; msg: string };

export function capturingLogger(level = "debug"): { log: Logger; lines: LogLine[] } {
  const lines: LogLine[] = [];
  const log = pino({ level }, { write: (line: string) => lines.push(JSON.parse(line) as LogLine) });
  return { log, lines };
}

/** The entries of an --audit-log file, in order ([] while vfiod has written none). */
export function readAuditLog(file: string): AuditEntry[] {
  if (!fs.existsSync(file)) return [];
  return fs
    .readFileSync(file, "utf8")
    .split("\n")
    .filter((line) => line !== "")
    .map((line) => JSON.parse(line) as AuditEntry);
}
