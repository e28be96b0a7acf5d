// Structured JSON logs on stderr (pino): one line per event, machine-readable.
import pino from "pino";

export type Logger = pino.Logger;

export function createLogger(level: string = process.env.VFIOD_LOG_LEVEL ?? "info"): Logger {
  return pino(
    {
      level,
      base: { service: "vfiod" },
      timestamp: pino.stdTimeFunctions.isoTime,
      formatters: { level: (label) => ({ level: label }) },
    },
    // Synchronous: the process exits right after its last line on SIGTERM, and order matters.
    pino.destination({ dest: 2, sync: true }),
  );
}

/** A logger that drops everything, for tests that do not look at logs. */
export function silentLogger(): Logger {
  return pino({ level: "silent" });
}
