// Firecracker has no VFIO device endpoint (../shared/reference/firecracker.yaml;
// its hot-plug preview covers virtio-block, -pmem and -net only). Like cocoon
// (cocoon.md A.3) it is only a lister: it implements no DeviceAttacher, so the
// registry refuses attach and detach with the contract's text. It lists nothing,
// and reads the VM's state from `GET /` (InstanceInfo) for ListVms.
import { Client } from "undici";
import { abortedError, Code, VfiodError } from "../errors";
import type { VmRecord } from "../inventory/vm";
import { isJsonObject } from "../json";
import { observed, unobserved, type HypervisorCallObserver } from "../hypervisor-calls";
import { DEFAULT_HYPERVISOR_TIMEOUT_MS, withinBound } from "../request-bound";
import type { AttachedDevice, DeviceLister } from "./backend";

export class FirecrackerBackend implements DeviceLister {
  constructor(
    private readonly requestTimeoutMs = DEFAULT_HYPERVISOR_TIMEOUT_MS,
    private readonly observe: HypervisorCallObserver = unobserved,
  ) {}

  async list(): Promise<AttachedDevice[]> {
    return [];
  }

  /** One short request per state read: nothing queues. */
  queues(): [string, number][] {
    return [];
  }

  /**
   * InstanceInfo.state: "Not started", "Running", "Paused". One short connection:
   * vfiod asks a Firecracker VM nothing else.
   */
  async state(vm: VmRecord, signal: AbortSignal): Promise<string> {
    const what = `firecracker vm ${vm.name}: describeInstance`;
    return withinBound(signal, this.requestTimeoutMs, what, async (bounded) => {
      const client = new Client("http://localhost", { socketPath: vm.socket });
      try {
        const { status, text } = await observed(this.observe, "firecracker", "describeInstance", async () => {
          const response = await client.request({ path: "/", method: "GET", signal: bounded });
          return { status: response.statusCode, text: await response.body.text() };
        });
        const body: unknown = JSON.parse(text);
        if (status !== 200 || !isJsonObject(body) || typeof body.state !== "string") {
          throw new VfiodError("HYPERVISOR_ERROR", `${what}: HTTP ${status}: ${text.slice(0, 200)}`, { code: Code.INTERNAL });
        }
        return body.state;
      } catch (err) {
        if (err instanceof VfiodError) throw err;
        if (bounded.aborted) throw abortedError(bounded, what);
        if (err instanceof SyntaxError) throw new VfiodError("HYPERVISOR_ERROR", `${what}: unparseable reply`, { code: Code.INTERNAL, cause: err });
        throw new VfiodError("HYPERVISOR_UNAVAILABLE", `${what}: api unreachable`, { cause: err });
      } finally {
        await client.destroy();
      }
    });
  }
}
