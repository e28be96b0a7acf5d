// --metrics-listen: Prometheus text format on /metrics (prom-client).
import http from "node:http";
import { Counter, Histogram, Registry, collectDefaultMetrics } from "prom-client";
import { splitHostPort } from "./config";

export class Metrics {
  readonly registry = new Registry();
  private readonly calls = new Counter({
    name: "vfiod_grpc_calls_total",
    help: "DeviceService calls by method and gRPC status code",
    labelNames: ["method", "code"] as const,
    registers: [this.registry],
  });
  private readonly seconds = new Histogram({
    name: "vfiod_grpc_call_duration_seconds",
    help: "DeviceService call duration by method",
    labelNames: ["method"] as const,
    buckets: [0.005, 0.025, 0.1, 0.5, 1, 2.5, 5, 10, 30],
    registers: [this.registry],
  });

  constructor() {
    collectDefaultMetrics({ register: this.registry });
  }

  observe(method: string, code: string, ms: number): void {
    this.calls.inc({ method, code });
    this.seconds.observe({ method }, ms / 1000);
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
