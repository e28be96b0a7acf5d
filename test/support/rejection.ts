import { VfiodError } from "../../src/errors";

/** The VfiodError `promise` rejects with; throws when it resolves or rejects with anything else. */
export async function vfiodRejection(promise: Promise<unknown>): Promise<VfiodError> {
  const outcome = await promise.then(
    (value: unknown) => ({ resolved: value }),
    (err: unknown) => ({ rejected: err }),
  );
  if ("resolved" in outcome) throw new Error(`expected a VfiodError, but it resolved to ${JSON.stringify(outcome.resolved)}`);
  if (outcome.rejected instanceof VfiodError) return outcome.rejected;
  throw new Error(`expected a VfiodError, got ${String(outcome.rejected)}`);
}
