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
    pino.destination(2),
  );
}

/** A logger that drops everything, for tests that do not look at logs. */
export function silentLogger(): Logger {
  return pino({ level: "silent" });
}
