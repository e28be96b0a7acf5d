// A Firecracker API double for the one endpoint vfiod calls: `GET /`
// (describeInstance, InstanceInfo in ../shared/reference/firecracker.yaml), served
// the way Firecracker's micro_http does (as the CH double does:
// ../shared/reference/cloud-hypervisor.md §1), over a Unix socket.
import net from "node:net";
import { listenOn } from "./listen";

export type FcState = "Not started" | "Running" | "Paused";

export class FcDouble {
  /** Request lines received, e.g. "GET /". */
  readonly requests: string[] = [];
  state: FcState = "Running";

  private constructor(
    private readonly server: net.Server,
    readonly socketPath: string,
  ) {}

  static async start(socketPath: string): Promise<FcDouble> {
    const server = net.createServer();
    const double = new FcDouble(server, socketPath);
    server.on("connection", (socket) => double.accept(socket));
    await listenOn(server, socketPath);
    return double;
  }

  async close(): Promise<void> {
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }

  private accept(socket: net.Socket): void {
    let buffer = "";
    socket.setEncoding("latin1");
    socket.on("error", () => socket.destroy());
    socket.on("data", (chunk: string) => {
      buffer += chunk;
      for (let end = buffer.indexOf("\r\n\r\n"); end >= 0; end = buffer.indexOf("\r\n\r\n")) {
        const [method = "", target = ""] = buffer.slice(0, buffer.indexOf("\r\n")).split(" ");
        buffer = buffer.slice(end + 4);
        this.requests.push(`${method} ${target}`);
        socket.write(this.answer(method, target));
      }
    });
  }

  private answer(method: string, target: string): string {
    const [status, body] =
      method === "GET" && target === "/"
        ? [200, JSON.stringify({ id: "anonymous-instance", state: this.state, vmm_version: "1.7.0", app_name: "Firecracker" })]
        : [400, JSON.stringify({ fault_message: `Invalid request method and/or path: ${method} ${target}.` })];
    return (
      `HTTP/1.1 ${status} \r\nServer: Firecracker API\r\nConnection: keep-alive\r\n` +
      `Content-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\n\r\n${body}`
    );
  }
}
