// Firecracker has no VFIO device endpoint (../shared/reference/firecracker.yaml;
// its hot-plug preview covers virtio-block, -pmem and -net only). Like cocoon
// (cocoon.md A.3) it is only a lister: it implements no DeviceAttacher, so the
// registry refuses attach and detach with the contract's text, and it lists nothing.
import type { AttachedDevice, DeviceLister } from "./backend";

export class FirecrackerBackend implements DeviceLister {
  async list(): Promise<AttachedDevice[]> {
    return [];
  }
}
