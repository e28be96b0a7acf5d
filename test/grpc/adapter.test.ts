// The adapter's typed client for a service with a server-streaming method
// (grpc.health.v1.Health's Watch): a promise per unary method, a stream per streaming one.
import { Health, HealthCheckResponse_ServingStatus } from "../../gen/grpc/health/v1/health_pb";
import { createClient } from "../../src/grpc/adapter";
import { buildFakeSysfs } from "../support/fake-sysfs";
import { startTestServer } from "../support/test-server";

test("Health's Check and List are promises, Watch a stream of messages, against a real server", async () => {
  const sysfs = buildFakeSysfs([]);
  const server = await startTestServer({ sysfsRoot: sysfs.root });
  const health = createClient(Health, server.address);
  try {
    expect((await health.check({ service: "" })).status).toBe(HealthCheckResponse_ServingStatus.SERVING);
    expect(Object.keys((await health.list({})).statuses).sort()).toEqual(["", "vfiod.v1.DeviceService", "vfiod.v1.InventoryService"]);
    const stream = health.watch({ service: "vfiod.v1.DeviceService" });
    const first = await new Promise((resolve, reject) => {
      stream.once("data", resolve);
      stream.once("error", reject);
    });
    expect(first).toMatchObject({ status: HealthCheckResponse_ServingStatus.SERVING });
    stream.cancel();
  } finally {
    health.close();
    await server.stop();
    sysfs.cleanup();
  }
});
