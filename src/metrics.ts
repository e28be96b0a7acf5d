// --metrics-listen: Prometheus text format on /metrics (prom-client): calls by
// method and code, their durations, hypervisor requests by backend and operation,
// and, read at each scrape, the devices each VM holds (as vfiod last saw them),
// the VMs vfiod can see, and the callers queued per hypervisor socket.
import http from "node:http";
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from "prom-client";
import { splitHostPort } from "./config";
import type { HypervisorCallObserver } from "./hypervisor-calls";

/** What the scrape-time gauges read. */
export interface MetricsSources {
  /** Each VM vfiod knows, with the devices it last saw it hold. */
  vmDevices(): { vm: string; devices: number }[];
  /** VM records per source ("inventory", "cocoon"). */
  inventorySize(): Promise<{ source: string; vms: number }[]>;
  /** Callers waiting per hypervisor socket: [backend, socket, waiting]. */
  queues(): [string, string, number][];
}

export class Metrics {
  readonly registry = new Registry();
  private readonly calls = new Counter({
    name: "vfiod_grpc_calls_total",
    help: "gRPC calls by method and status code",
    labelNames: ["method", "code"] as const,
    registers: [this.registry],
  });
  private readonly seconds = new Histogram({
    name: "vfiod_grpc_call_duration_seconds",
    help: "gRPC call duration by method",
    labelNames: ["method"] as const,
    buckets: [0.005, 0.025, 0.1, 0.5, 1, 2.5, 5, 10, 30],
    registers: [this.registry],
  });
  private readonly hypervisorSeconds = new Histogram({
    name: "vfiod_hypervisor_call_duration_seconds",
    help: "Hypervisor request duration by backend and operation (a CH endpoint, a QMP command); answered=false for none",
    labelNames: ["backend", "operation", "answered"] as const,
    buckets: [0.001, 0.005, 0.025, 0.1, 0.5, 1, 5, 30, 120],
    registers: [this.registry],
  });

  constructor() {
    collectDefaultMetrics({ register: this.registry });
  }

  /** The observer backends report each hypervisor request to. */
  readonly observeHypervisorCall: HypervisorCallObserver = (backend, operation, seconds, answered) =>
    this.hypervisorSeconds.observe({ backend, operation, answered: String(answered) }, seconds);

  observe(method: string, code: string, ms: number): void {
    this.calls.inc({ method, code });
    this.seconds.observe({ method }, ms / 1000);
  }

  /** The gauges read at each scrape. */
  readFrom(sources: MetricsSources): void {
    const registers = [this.registry];
    new Gauge({
      name: "vfiod_vm_attached_devices",
      help: "VFIO devices each VM holds, as vfiod last read it (a List, a background refresh, its own mutations)",
      labelNames: ["vm"] as const,
      registers,
      collect() {
        this.reset();
        for (const { vm, devices } of sources.vmDevices()) this.set({ vm }, devices);
      },
    });
    new Gauge({
      name: "vfiod_inventory_vms",
      help: "VMs vfiod can see, by source",
      labelNames: ["source"] as const,
      registers,
      async collect() {
        this.reset();
        for (const { source, vms } of await sources.inventorySize()) this.set({ source }, vms);
      },
    });
    new Gauge({
      name: "vfiod_hypervisor_queue_length",
      help: "Callers waiting for a hypervisor socket beyond those it is serving",
      labelNames: ["backend", "socket"] as const,
      registers,
      collect() {
        this.reset();
        for (const [backend, socket, waiting] of sources.queues()) this.set({ backend, socket }, waiting);
      },
    });
  }

  /** Serves /metrics on HOST:PORT; resolves with the bound port. */
  listen(hostPort: string): Promise<{ server: http.Server; port: number }> {
    const { host, port } = splitHostPort(hostPort);
    const server = http.createServer((req, res) => {
      if (req.url !== "/metrics") {
        res.writeHead(404).end("not found\n");
        return;
      }
      this.registry.metrics().then(
        (text) => res.writeHead(200, { "Content-Type": this.registry.contentType }).end(text),
        () => res.writeHead(500).end("metrics unavailable\n"),
      );
    });
    return new Promise((resolve, reject) => {
      server.once("error", reject);
      server.listen(port, host, () => {
        const address = server.address();
        resolve({ server, port: typeof address === "object" && address !== null ? address.port : 0 });
      });
    });
  }
}
