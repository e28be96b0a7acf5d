// The adapter's clients: a service with a streaming method (grpc.health.v1.Health's Watch).
import { Health } from "../../gen/grpc/health/v1/health_pb";
import { createClient, createUnaryClient } from "../../src/grpc/adapter";

test("createClient refuses a service with a streaming method; createUnaryClient has its unary methods only", () => {
  expect(() => createClient(Health, "127.0.0.1:1")).toThrow(
    "grpc.health.v1.Health.Watch: only unary methods are supported, not server_streaming",
  );
  const client = createUnaryClient(Health, "127.0.0.1:1");
  try {
    expect(Object.keys(client).sort()).toEqual(["check", "close", "grpc", "list"]);
    // @ts-expect-error Watch streams: it is not on the client (tsc checks this line)
    expect(client.watch).toBeUndefined();
  } finally {
    client.close();
  }
});
