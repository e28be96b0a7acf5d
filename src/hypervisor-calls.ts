// What every hypervisor request reports once it ends, for the metrics: which
// backend, which operation (a CH endpoint, a QMP command), how long, and whether it
// got an answer. Backends call it; they know nothing of Prometheus.

export type HypervisorCallObserver = (backend: string, operation: string, seconds: number, answered: boolean) => void;

/** For backends built without metrics (tests, tools). */
export const unobserved: HypervisorCallObserver = () => undefined;

/**
 * Runs one request and tells `observe` how long it took and whether an answer
 * came: it did when `request` resolved, or when it failed with what `isAnswer`
 * calls an answer (a QMP error reply).
 */
export async function observed<T>(
  observe: HypervisorCallObserver,
  backend: string,
  operation: string,
  request: () => Promise<T>,
  isAnswer: (err: unknown) => boolean = () => false,
): Promise<T> {
  const started = performance.now();
  let answered = false;
  try {
    const value = await request();
    answered = true;
    return value;
  } catch (err) {
    answered = isAnswer(err);
    throw err;
  } finally {
    observe(backend, operation, (performance.now() - started) / 1000, answered);
  }
}
