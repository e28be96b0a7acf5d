// A stand-in for a hypervisor process: a tiny bash process whose command line
// names the VM's API socket (as cloud-hypervisor's does: --api-socket path=...)
// and which really holds files open, so vfiod's kernel view (/proc/<pid>/fd)
// sees a VFIO group node held by that VM's process. Opens and closes are acked,
// so a caller can wait until the kernel shows them.
import { spawn, type ChildProcessWithoutNullStreams } from "node:child_process";
import readline from "node:readline";

// Reads "open FD PATH" / "close FD" lines; answers one line per command.
const SCRIPT = `while IFS=' ' read -r cmd fd path; do
  case $cmd in
    open) if eval "exec $fd<\\"\\$path\\""; then echo ok; else echo fail; fi ;;
    close) eval "exec $fd<&-"; echo ok ;;
  esac
done`;

const live = new Set<ChildProcessWithoutNullStreams>();
process.on("exit", () => live.forEach((child) => child.kill("SIGKILL")));

export class VmmProcess {
  private readonly fds = new Map<string, { fd: number; users: number }>();
  private nextFd = 10;
  private acks: ((line: string) => void)[] = [];
  private last: Promise<void> = Promise.resolve();

  private constructor(private readonly child: ChildProcessWithoutNullStreams) {
    readline.createInterface({ input: child.stdout }).on("line", (line) => this.acks.shift()?.(line));
  }

  /** `argv0` and `args` are what /proc/<pid>/cmdline shows after bash's own "-c script". */
  static spawn(argv0: string, args: readonly string[]): VmmProcess {
    const child = spawn("bash", ["-c", SCRIPT, argv0, ...args], { stdio: ["pipe", "pipe", "pipe"] });
    live.add(child);
    child.once("exit", () => live.delete(child));
    return new VmmProcess(child);
  }

  get pid(): number {
    return this.child.pid ?? 0;
  }

  /** Holds `file` open (once however many times it is asked; closed when every user let go). */
  open(file: string): void {
    const held = this.fds.get(file);
    if (held !== undefined) {
      held.users += 1;
      return;
    }
    const fd = this.nextFd++;
    this.fds.set(file, { fd, users: 1 });
    this.send(`open ${fd} ${file}`);
  }

  close(file: string): void {
    const held = this.fds.get(file);
    if (held === undefined) return;
    held.users -= 1;
    if (held.users > 0) return;
    this.fds.delete(file);
    this.send(`close ${held.fd}`);
  }

  /** Files held open now. */
  holding(): string[] {
    return [...this.fds.keys()];
  }

  /** Resolves once every open and close sent so far is done. */
  settled(): Promise<void> {
    return this.last;
  }

  /** Kills it; resolves once it has exited, so /proc no longer lists it. */
  stop(): Promise<void> {
    if (this.child.exitCode !== null || this.child.signalCode !== null) return Promise.resolve();
    const exited = new Promise<void>((resolve) => this.child.once("exit", () => resolve()));
    this.child.kill("SIGKILL");
    return exited;
  }

  private send(command: string): void {
    const acked = new Promise<void>((resolve, reject) => {
      this.acks.push((line) => (line === "ok" ? resolve() : reject(new Error(`vmm stand-in: ${command}: ${line}`))));
    });
    this.child.stdin.write(`${command}\n`);
    this.last = this.last.then(() => acked);
  }
}
