// TLS, mTLS and --allow-client against a real vfiod process, plus the audit
// trail naming the certificate.
import * as grpc from "@grpc/grpc-js";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { createDeviceClient, errorReason } from "../../src/grpc/client";
import { ChDouble } from "../support/ch-double";
import { makePki, opensslAvailable, type Pki } from "../support/certs";
import { startVfiod, type VfiodProcess } from "../support/vfiod-process";

const haveOpenssl = opensslAvailable();
const describeTls = haveOpenssl ? describe : describe.skip;

describeTls("mTLS with a client allow-list", () => {
  let dir: string;
  let pki: Pki;
  let ch: ChDouble;
  let vfiod: VfiodProcess;
  let auditFile: string;

  beforeAll(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), "vfiod-tls-"));
    pki = makePki(dir);
    ch = await ChDouble.start(path.join(dir, "ch.sock"));
    ch.setState("Running");
    const inventory = path.join(dir, "inventory.json");
    fs.writeFileSync(inventory, JSON.stringify({ vms: [{ name: "vm", hypervisor: "cloud-hypervisor", socket: path.join(dir, "ch.sock") }] }));
    auditFile = path.join(dir, "audit.log");
    vfiod = await startVfiod([
      "--inventory", inventory, "--cocoon-root", dir, "--sysfs-root", dir,
      "--tls-cert", pki.file("server.pem"), "--tls-key", pki.file("server.key"), "--tls-client-ca", pki.file("ca.pem"),
      "--allow-client", "ctl-1,ctl-2.example", "--audit-log", auditFile,
    ]);
  }, 60_000);

  afterAll(async () => {
    await vfiod.stop();
    await ch.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  const clientWith = (name: string | undefined, ca = "ca.pem") =>
    createDeviceClient(
      vfiod.address,
      grpc.credentials.createSsl(
        fs.readFileSync(pki.file(ca)),
        name === undefined ? null : fs.readFileSync(pki.file(`${name}.key`)),
        name === undefined ? null : fs.readFileSync(pki.file(`${name}.pem`)),
      ),
      { "grpc.ssl_target_name_override": "localhost" },
    );

  async function outcome(name: string | undefined, ca?: string): Promise<{ code: number; reason?: string } | "ok"> {
    const client = clientWith(name, ca);
    try {
      await client.list({ vm: "vm" }, { timeoutMs: 5000 });
      return "ok";
    } catch (err) {
      return { code: (err as grpc.ServiceError).code, reason: errorReason(err) };
    } finally {
      client.close();
    }
  }

  test("a client whose certificate CN is allowed is served", async () => {
    expect(await outcome("allowed")).toBe("ok");
  });

  test("a client allowed by a DNS SAN is served", async () => {
    expect(await outcome("san-only")).toBe("ok");
  });

  test("a client without a certificate is refused at the handshake", async () => {
    expect(await outcome(undefined)).toMatchObject({ code: grpc.status.UNAVAILABLE });
  });

  test("a client with a certificate from another CA is refused at the handshake", async () => {
    expect(await outcome("foreign")).toMatchObject({ code: grpc.status.UNAVAILABLE });
  });

  test("a client with a valid certificate not on the allow-list is PERMISSION_DENIED (CLIENT_NOT_ALLOWED)", async () => {
    expect(await outcome("stranger")).toEqual({ code: grpc.status.PERMISSION_DENIED, reason: "CLIENT_NOT_ALLOWED" });
    expect(ch.requests.filter((r) => r.endpoint === "vm.add-device")).toEqual([]);
  });

  test("the audit log names the certificate of each mutation's caller, refused or not", async () => {
    const stranger = clientWith("stranger");
    const allowed = clientWith("allowed");
    await stranger.detach({ vm: "vm", id: "gpu0" }, { timeoutMs: 5000 }).catch(() => undefined);
    await allowed.detach({ vm: "vm", id: "gpu0" }, { timeoutMs: 5000 }).catch(() => undefined);
    stranger.close();
    allowed.close();
    const lines = fs.readFileSync(auditFile, "utf8").trim().split("\n").map((l) => JSON.parse(l) as Record<string, unknown>);
    expect(lines).toEqual(
      expect.arrayContaining([
        // Refused before the request was looked at: the VM as typed, nothing resolved.
        expect.objectContaining({ caller: "cn=intruder", method: "Detach", vmRef: "vm", vm: "", outcome: "CLIENT_NOT_ALLOWED", code: 7 }),
        expect.objectContaining({ caller: "cn=ctl-1", method: "Detach", vmRef: "vm", vm: "vm", id: "gpu0", outcome: "DEVICE_NOT_ATTACHED", code: 5 }),
      ]),
    );
    for (const line of lines) expect(typeof line.ms).toBe("number");
  });
});
