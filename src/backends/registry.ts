// Backends keyed by hypervisor type, filled once at start (containerd's plugin
// registry shape): a duplicate type is a programming error and throws at boot.
import { VfiodError } from "../errors";
import type { HypervisorKind } from "../inventory/vm";
import type { Backend } from "./backend";

export class BackendRegistry {
  private readonly backends = new Map<HypervisorKind, Backend>();

  register(kind: HypervisorKind, backend: Backend): this {
    if (kind === "") throw new Error("backend registered without a hypervisor type");
    if (this.backends.has(kind)) throw new Error(`backend for ${kind} registered twice`);
    this.backends.set(kind, backend);
    return this;
  }

  /** Registered types, in registration order. */
  kinds(): HypervisorKind[] {
    return [...this.backends.keys()];
  }

  /** @throws VfiodError BACKEND_UNSUPPORTED (UNIMPLEMENTED) naming the type. */
  get(kind: HypervisorKind): Backend {
    const backend = this.backends.get(kind);
    if (backend === undefined) {
      throw new VfiodError("BACKEND_UNSUPPORTED", `hypervisor type ${JSON.stringify(kind)} has no backend in vfiod`, {
        meta: { hypervisor: kind },
      });
    }
    return backend;
  }
}
