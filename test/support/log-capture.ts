// A logger whose JSON lines a test can read back: what vfiod would have written to stderr.
import pino from "pino";
import type { Logger } from "../../src/log";

export type LogLine = Record<string, unknown> & { level: number; msg: string };

export function capturingLogger(level = "debug"): { log: Logger; lines: LogLine[] } {
  const lines: LogLine[] = [];
  const log = pino({ level }, { write: (line: string) => lines.push(JSON.parse(line) as LogLine) });
  return { log, lines };
}
