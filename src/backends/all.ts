// The one list of hypervisor backends: a new hypervisor is one file plus one line here.
import { CloudHypervisorBackend } from "./cloud-hypervisor/backend";
import { FirecrackerBackend } from "./firecracker";
import { QemuBackend } from "./qemu/backend";
import { BackendRegistry } from "./registry";

export function defaultBackends(): BackendRegistry {
  return new BackendRegistry()
    .register("cloud-hypervisor", new CloudHypervisorBackend())
    .register("qemu", new QemuBackend())
    .register("firecracker", new FirecrackerBackend());
}
