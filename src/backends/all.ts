// The one list of hypervisor backends: a new hypervisor is one file plus one line here.
import { DEFAULT_HYPERVISOR_TIMEOUT_MS } from "../request-bound";
import { CloudHypervisorBackend } from "./cloud-hypervisor/backend";
import { CloudHypervisorSockets } from "./cloud-hypervisor/client";
import { FirecrackerBackend } from "./firecracker";
import { QemuBackend } from "./qemu/backend";
import { BackendRegistry } from "./registry";

/** @param hypervisorTimeoutMs vfiod's bound on each hypervisor request (--hypervisor-timeout). */
export function defaultBackends(hypervisorTimeoutMs = DEFAULT_HYPERVISOR_TIMEOUT_MS): BackendRegistry {
  return new BackendRegistry()
    .register("cloud-hypervisor", new CloudHypervisorBackend({ sockets: new CloudHypervisorSockets(hypervisorTimeoutMs) }))
    .register("qemu", new QemuBackend({ requestTimeoutMs: hypervisorTimeoutMs }))
    .register("firecracker", new FirecrackerBackend(hypervisorTimeoutMs));
}
