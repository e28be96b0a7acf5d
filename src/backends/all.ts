// The one list of hypervisor backends: a new hypervisor is one file plus one line here.
import { unobserved, type HypervisorCallObserver } from "../hypervisor-calls";
import { DEFAULT_HYPERVISOR_TIMEOUT_MS } from "../request-bound";
import { CloudHypervisorBackend } from "./cloud-hypervisor/backend";
import { CloudHypervisorSockets } from "./cloud-hypervisor/client";
import { FirecrackerBackend } from "./firecracker";
import { QemuBackend } from "./qemu/backend";
import { BackendRegistry } from "./registry";

/**
 * @param hypervisorTimeoutMs vfiod's bound on each hypervisor request (--hypervisor-timeout).
 * @param observe told of every hypervisor request once it ends (metrics).
 */
export function defaultBackends(
  hypervisorTimeoutMs = DEFAULT_HYPERVISOR_TIMEOUT_MS,
  observe: HypervisorCallObserver = unobserved,
): BackendRegistry {
  return new BackendRegistry()
    .register("cloud-hypervisor", new CloudHypervisorBackend({ sockets: new CloudHypervisorSockets(hypervisorTimeoutMs, observe) }))
    .register("qemu", new QemuBackend({ requestTimeoutMs: hypervisorTimeoutMs, observe }))
    .register("firecracker", new FirecrackerBackend(hypervisorTimeoutMs, observe));
}
