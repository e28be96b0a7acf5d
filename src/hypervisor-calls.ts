// What every hypervisor request reports once it ends, for the metrics: which
// backend, which operation (a CH endpoint, a QMP command), how long, and whether it
// got an answer. Backends call it; they know nothing of Prometheus.

export type HypervisorCallObserver = (backend: string, operation: string, seconds: number, answered: boolean) => void;

/** For backends built without metrics (tests, tools). */
export const unobserved: HypervisorCallObserver = () => undefined;
