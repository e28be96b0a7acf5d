// Backends keyed by hypervisor type, filled once at start (containerd's plugin
// registry shape): a duplicate type is a programming error and throws at boot.
import { VfiodError } from "../errors";
import type { HypervisorKind } from "../inventory/vm";
import { canAttach, type Backend, type DeviceAttacher, type DeviceLister } from "./backend";

/** cocoon's ErrUnsupportedBackend text (cocoon.md A.1); the contract promises it in the message. */
export const UNSUPPORTED_MESSAGE = "backend does not support device attach";

export class BackendRegistry {
  private readonly backends = new Map<HypervisorKind, Backend>();

  register(kind: HypervisorKind, backend: Backend): this {
    if (kind === "") throw new Error("backend registered without a hypervisor type");
    if (this.backends.has(kind)) throw new Error(`backend for ${kind} registered twice`);
    this.backends.set(kind, backend);
    return this;
  }

  /** Callers queued per hypervisor socket, across backends: [backend, socket, waiting]. */
  queues(): [HypervisorKind, string, number][] {
    return [...this.backends].flatMap(([kind, backend]) => backend.queues().map(([socket, n]): [HypervisorKind, string, number] => [kind, socket, n]));
  }

  /** Registered types, in registration order. */
  kinds(): HypervisorKind[] {
    return [...this.backends.keys()];
  }

  /** @throws VfiodError BACKEND_UNSUPPORTED (UNIMPLEMENTED) naming the type. */
  lister(kind: HypervisorKind): DeviceLister {
    return this.backends.get(kind) ?? throwNoBackend(kind);
  }

  /**
   * The backend of a type that can hot-plug, checked before anything else is
   * touched (cocoon's resolveAttacher comes first too).
   * @throws VfiodError BACKEND_UNSUPPORTED (UNIMPLEMENTED): with cocoon's text for a
   *   backend that cannot hot-plug (Firecracker), naming the type for an unknown one.
   */
  attacher(kind: HypervisorKind, verb: "attach" | "detach"): DeviceAttacher {
    const backend = this.backends.get(kind) ?? throwNoBackend(kind);
    if (canAttach(backend)) return backend;
    // cocoon's wrapping: "device attach: backend firecracker: backend does not support device attach".
    throw new VfiodError("BACKEND_UNSUPPORTED", `device ${verb}: backend ${kind}: ${UNSUPPORTED_MESSAGE}`, {
      meta: { hypervisor: kind },
    });
  }
}

function throwNoBackend(kind: HypervisorKind): never {
  throw new VfiodError("BACKEND_UNSUPPORTED", `hypervisor type ${JSON.stringify(kind)} has no backend in vfiod`, {
    meta: { hypervisor: kind },
  });
}
