// Firecracker has no VFIO device endpoint (../shared/reference/firecracker.yaml;
// its hot-plug preview covers virtio-block, -pmem and -net only). Like cocoon
// (cocoon.md A.3), refuse attach/detach with the contract's text and list nothing.
import { VfiodError } from "../errors";
import type { AttachedDevice, Backend } from "./backend";

/** cocoon's ErrUnsupportedBackend text; the contract promises it in the message. */
export const UNSUPPORTED_MESSAGE = "backend does not support device attach";

function refuse(verb: string): VfiodError {
  return new VfiodError("BACKEND_UNSUPPORTED", `device ${verb}: backend firecracker: ${UNSUPPORTED_MESSAGE}`, {
    meta: { hypervisor: "firecracker" },
  });
}

export class FirecrackerBackend implements Backend {
  async attach(): Promise<AttachedDevice> {
    throw refuse("attach");
  }

  async detach(): Promise<void> {
    throw refuse("detach");
  }

  async list(): Promise<AttachedDevice[]> {
    return [];
  }
}
