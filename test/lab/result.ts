// The lab's files: lab.json (what l1-main.sh set up inside L1, read by the driver)
// and result.json (what the driver saw, read by lab.test.ts).

/** An emulated device l1-main.sh bound to vfio-pci. */
export interface LabPciDevice {
  /** Full BDF inside L1, e.g. "0000:00:10.0". */
  bdf: string;
  /** "vendor:device", lower-case hex, as the L2 guest reports it. */
  vendorDevice: string;
}

/** lab.json. */
export interface LabConfig {
  /** The writable output directory (on the work share). */
  out: string;
  devices: {
    nic: LabPciDevice;
    nvme: LabPciDevice;
    /** A third device, for the firmware-only VM, so both VMs can be driven at once. */
    spare: LabPciDevice;
    /** On vfio-pci while the rest of its IOMMU group stays on host drivers. */
    nonViable: string;
  };
  vms: {
    /** The L2 that boots a busybox guest reporting PCI hot-plug on its console. */
    boot: { name: string; qmp: string; serial: string };
    /** The L2 that runs firmware only: nothing ever acks an unplug. */
    firmware: { name: string; qmp: string };
  };
  /** When the booting L2's QEMU was started (ms since the epoch, L1's clock). */
  l2StartedAtMs: number;
  timings: { l1BootMs: number; bindMs: number };
}

/** A device as vfiod's Attach and List return it. */
export interface LabDevice {
  id: string;
  bdf: string;
  path: string;
  guestBdf: string;
}

/** What the L2 guest printed when a device came or went. */
export interface GuestLine {
  /** The device's address in the guest. */
  guestBdf: string;
  line: string;
}

/** What each step saw when it went as planned (a refusal's is in `failure`). */
export interface StepValues {
  "vfiod ready": { pid: number };
  "list l2 before attach": { devices: LabDevice[] };
  "attach 00:1f.2 (non-viable group)": { device: LabDevice };
  "L2 guest booted": { line: string };
  "attach NIC": { device: LabDevice };
  "L2 guest sees NIC": GuestLine;
  "attach NIC to l2fw while l2 holds it": { device: LabDevice };
  "attach NVMe": { device: LabDevice };
  "L2 guest sees NVMe": GuestLine;
  "list l2 with both": { devices: LabDevice[] };
  "detach NIC": Record<string, never>;
  "L2 guest lost NIC": GuestLine;
  "detach NVMe": Record<string, never>;
  "L2 guest lost NVMe": GuestLine;
  "list l2 after detach": { devices: LabDevice[] };
  "attach spare to l2fw": { device: LabDevice };
  "detach from l2fw": Record<string, never>;
  "list l2fw after detach": { devices: LabDevice[] };
  "vfiod stops": { exitCode: number | null; signal: string | null };
}
export type StepName = keyof StepValues;

/** How a gRPC call failed, as the client saw it. */
export interface CallFailure {
  /** gRPC status number. */
  code: number;
  /** google.rpc.ErrorInfo.reason, when vfiod sent one. */
  reason?: string;
  /** The status message. */
  details: string;
}

/** One step, recorded when it finished. */
export interface Step<N extends StepName = StepName> {
  name: N;
  /** A call's round trip; a wait's time until it saw what it waited for. */
  ms: number;
  /** When it finished, in ms since the driver started. */
  at: number;
  /** The bound the call or wait had. */
  deadlineMs: number;
  /** It went as the driver planned (a refusal, where the plan was a refusal). */
  ok: boolean;
  value?: StepValues[N];
  failure?: CallFailure;
  /** Why it did not go as planned. */
  error?: string;
}

/** result.json. */
export interface LabResult {
  /** Every step ran and went as planned. */
  ok: boolean;
  config: LabConfig;
  /** The other members of config.devices.nonViable's IOMMU group. */
  companions: string[];
  /** vfiod's --detach-timeout, in ms. */
  detachTimeoutMs: number;
  steps: Step[];
}
