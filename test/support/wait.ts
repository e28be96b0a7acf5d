// Polls a condition instead of sleeping a fixed time: fast when things are fast,
// patient on a loaded machine, and says what it waited for when it gives up.
export async function waitFor(
  condition: () => boolean | Promise<boolean>,
  what = "condition",
  timeoutMs = 10_000,
  everyMs = 10,
): Promise<void> {
  const until = Date.now() + timeoutMs;
  while (!(await condition())) {
    if (Date.now() > until) throw new Error(`not within ${timeoutMs} ms: ${what}`);
    await new Promise((resolve) => setTimeout(resolve, everyMs));
  }
}
