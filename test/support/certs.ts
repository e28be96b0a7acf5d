// Test PKI made with the openssl CLI: two CAs, a server certificate for
// 127.0.0.1/localhost, and client certificates with chosen CNs.
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { commandRuns } from "./skip";

/**
 * Whether the openssl CLI runs here; when not, says why so skipped tests are explained.
 * @throws in CI when it does not (./skip.ts).
 */
export function opensslAvailable(): boolean {
  return commandRuns("openssl", ["version"], "TLS tests");
}

export interface Pki {
  readonly dir: string;
  /** PEM paths. */
  file(name: string): string;
}

function openssl(args: string[], cwd: string): void {
  execFileSync("openssl", args, { cwd, stdio: "pipe" });
}

function makeCa(dir: string, name: string): void {
  openssl(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", `/CN=${name}`,
    "-keyout", `${name}.key`, "-out", `${name}.pem`], dir);
}

function makeLeaf(dir: string, ca: string, name: string, cn: string, san: string): void {
  fs.writeFileSync(path.join(dir, `${name}.ext`), `subjectAltName=${san}\n`);
  openssl(["req", "-newkey", "rsa:2048", "-nodes", "-subj", `/CN=${cn}`, "-keyout", `${name}.key`, "-out", `${name}.csr`], dir);
  openssl(["x509", "-req", "-in", `${name}.csr`, "-CA", `${ca}.pem`, "-CAkey", `${ca}.key`, "-CAcreateserial",
    "-days", "2", "-extfile", `${name}.ext`, "-out", `${name}.pem`], dir);
}

/** ca + server + clients "allowed" (CN ctl-1), "stranger" (CN intruder) from ca, "foreign" from other-ca. */
export function makePki(dir: string): Pki {
  makeCa(dir, "ca");
  makeCa(dir, "other-ca");
  makeLeaf(dir, "ca", "server", "localhost", "DNS:localhost,IP:127.0.0.1");
  makeLeaf(dir, "ca", "allowed", "ctl-1", "DNS:ctl-1.example");
  makeLeaf(dir, "ca", "san-only", "some-cn", "DNS:ctl-2.example");
  makeLeaf(dir, "ca", "stranger", "intruder", "DNS:intruder.example");
  makeLeaf(dir, "other-ca", "foreign", "ctl-1", "DNS:ctl-1.example");
  return { dir, file: (name) => path.join(dir, name) };
}
