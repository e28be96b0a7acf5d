// The lab's files: lab.json (what l1-main.sh set up inside L1, read by the driver)
// and result.json (what the driver saw, read by lab.test.ts).

/** An emulated device l1-main.sh bound to vfio-pci. */
export interface LabPciDevice {
  /** Full BDF inside L1, e.g. "0000:00:10.0". */
  bdf: string;
  /** "vendor:device", lower-case hex, as the L2 guest reports it. */
  vendorDevice: string;
}

/** The NIC l1-main.sh leaves on its host driver, for managed binding. */
export interface LabHostDevice extends LabPciDevice {
  /** Its driver in L1 ("e1000"). */
  hostDriver: string;
  /** Its network interface in L1, as the driver named it at boot. */
  interface: string;
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
    /** On its host driver: a managed Attach binds it, Detach gives it back. */
    managed: LabHostDevice;
    /** Two functions of one slot, one IOMMU group: the requested one first, then its companion. */
    group: [LabPciDevice, LabPciDevice];
  };
  vms: {
    /** The L2 that boots a busybox guest reporting PCI hot-plug on its console. */
    boot: { name: string; qmp: string; serial: string };
    /** The L2 that runs firmware only: nothing ever acks an unplug. */
    firmware: { name: string; qmp: string };
    /** No QEMU: the driver serves a socket that never greets, so an attach to it hangs. */
    hung: { name: string; qmp: string };
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

/** A host device as L1's sysfs shows it. */
export interface HostDriverState {
  bdf: string;
  /** Bound driver, null when none. */
  driver: string | null;
  /** driver_override as read ("(null)" when unset). */
  override: string;
  /** Its network interfaces (net/). */
  interfaces: string[];
}

/** What each step saw when it went as planned (a refusal's is in `failure`). */
export interface StepValues {
  "vfiod ready": { pid: number; port: number };
  "vfiod ready (to be killed)": { pid: number; port: number };
  "vfiod ready (without --manage-binding)": { pid: number; port: number };
  "managed attach without --manage-binding": { device: LabDevice };
  "device untouched after BINDING_DISABLED": HostDriverState;
  "vfiod without --manage-binding stops": { exitCode: number | null; signal: string | null };
  "managed attach to the hung VM: bound, not attached": HostDriverState & { boundAfterMs: number; stateFiles: string[] };
  "vfiod killed mid-attach": { exitCode: number | null; signal: string | null };
  "restarted vfiod put the device back": HostDriverState & { stateFiles: string[]; restoreMs: number; logLine: string };
  "managed attach while its interface is up": { device: LabDevice };
  "managed attach outside --allow-devices": { device: LabDevice };
  "device outside --allow-devices untouched": { before: HostDriverState; after: HostDriverState };
  "managed attach NIC": { device: LabDevice };
  "managed NIC on vfio-pci in L1": HostDriverState;
  "L2 guest sees managed NIC": GuestLine;
  "managed detach NIC": Record<string, never>;
  "L1 driver owns managed NIC again": HostDriverState & { waitedMs: number };
  "L2 guest lost managed NIC": GuestLine;
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
  "whole-group attach": { device: LabDevice; companions: LabDevice[] };
  "L2 guest sees the whole group": { lines: GuestLine[] };
  "list l2 with the group": { devices: LabDevice[] };
  "whole-group detach": Record<string, never>;
  "L2 guest lost the whole group": { lines: GuestLine[] };
  "list l2 after whole-group detach": { devices: LabDevice[] };
  "attach NIC under the companion's id": { device: LabDevice };
  "whole-group attach meets a taken companion id": { device: LabDevice };
  "L2 guest saw the requested function come and go": { lines: GuestLine[] };
  "list l2 after the rollback": { devices: LabDevice[] };
  "detach NIC under the companion's id": Record<string, never>;
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
  /** Managed binding's timings, for the record (ms; -1 when the step did not run as planned). */
  managedTimings: ManagedTimings;
  steps: Step[];
}

export interface ManagedTimings {
  /** The managed Attach call: bind to vfio-pci and device_add. */
  attachMs: number;
  /** The Detach call: device_del, DEVICE_DELETED, and the host driver restored. */
  detachMs: number;
  /** From the Detach call to the host driver's interface back in L1. */
  backOnHostDriverMs: number;
  /** From the Attach call to the device on vfio-pci, when the attach then hung. */
  bindMs: number;
  /** The restarted vfiod's restore of the device it found half-done. */
  repairRestoreMs: number;
}
