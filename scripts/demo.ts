// `npm run demo`: a real QEMU VM (q35, spare PCIe root ports, QMP socket, no
// disk: SeaBIOS runs and finds nothing to boot, which is enough for hot-plug
// bookkeeping), an inventory naming it "demo", and vfiod serving it on the
// default port, so grpcurl or vfiodctl can talk to a live VM at once.
import { spawn, type ChildProcess } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";

const SPARE_ROOT_PORTS = 4;
const dir = fs.mkdtempSync(path.join(os.tmpdir(), "vfiod-demo-"));
const qmpSocket = path.join(dir, "qmp.sock");
const inventory = path.join(dir, "inventory.json");
const children: ChildProcess[] = [];

function rootPorts(): string[] {
  return Array.from({ length: SPARE_ROOT_PORTS }, (_, i) => [
    "-device",
    `pcie-root-port,id=rp${i + 1},bus=pcie.0,chassis=${i + 1},slot=${i + 1}`,
  ]).flat();
}

async function waitForSocket(socket: string, timeoutMs: number): Promise<void> {
  const until = Date.now() + timeoutMs;
  while (Date.now() < until) {
    if (fs.existsSync(socket)) return;
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  throw new Error(`QEMU did not create its QMP socket within ${timeoutMs} ms`);
}

function stopAll(code: number): never {
  for (const child of children) child.kill("SIGTERM");
  fs.rmSync(dir, { recursive: true, force: true });
  process.exit(code);
}

async function main(): Promise<void> {
  const qemu = spawn(
    "qemu-system-x86_64",
    ["-display", "none", "-nodefaults", "-no-user-config", "-machine", "q35", "-accel", "tcg", "-m", "128",
      "-qmp", `unix:${qmpSocket},server=on,wait=off`, ...rootPorts()],
    { stdio: ["ignore", "inherit", "inherit"] },
  );
  children.push(qemu);
  qemu.once("error", (err) => {
    console.error(`cannot start qemu-system-x86_64 (${err.message}); install it: apt-get install -y qemu-system-x86`);
    stopAll(1);
  });
  qemu.once("exit", (code) => {
    console.error(`QEMU exited (${code})`);
    stopAll(1);
  });
  await waitForSocket(qmpSocket, 10_000);
  fs.writeFileSync(inventory, JSON.stringify({ vms: [{ name: "demo", hypervisor: "qemu", socket: qmpSocket }] }, null, 2));
  const vfiod = spawn(process.execPath, [path.join(__dirname, "../src/main.js"), "--inventory", inventory, ...process.argv.slice(2)], {
    stdio: ["ignore", "inherit", "inherit"],
  });
  children.push(vfiod);
  vfiod.once("exit", (code) => stopAll(code ?? 1));
  console.log(`
demo VM "demo" (QEMU q35, ${SPARE_ROOT_PORTS} spare root ports) is running; vfiod serves it on 127.0.0.1:50051.
Try, in another terminal:
  grpcurl -plaintext -d '{"vm":"demo"}' 127.0.0.1:50051 vfiod.v1.DeviceService/List
  node dist/src/cli.js vms
  node dist/src/cli.js devices --vfio-only
  node dist/src/cli.js list demo
Ctrl-C stops vfiod and the VM.
`);
  for (const signal of ["SIGINT", "SIGTERM"] as const) process.on(signal, () => stopAll(0));
}

void main();
