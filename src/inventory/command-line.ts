// Whether a process's command line names a hypervisor control socket: how vfiod
// tells which VM a process is (cocoon's liveness check, and the holder of an open
// VFIO group).

/**
 * The socket must be a whole argument or a whole value in one: "--api-socket=X",
 * CH's "path=X,...", QEMU's "unix:X,server=on"; so /run/a/api.sock does not match
 * /var/run/a/api.sock nor /run/a/api.sock.old.
 */
export function argNamesSocket(arg: string, socket: string): boolean {
  for (let at = arg.indexOf(socket); at !== -1; at = arg.indexOf(socket, at + 1)) {
    const before = arg[at - 1];
    const after = arg[at + socket.length];
    if ((before === undefined || before === "=" || before === ":") && (after === undefined || after === ",")) return true;
  }
  return false;
}

/** Whether any argument of a NUL-separated /proc/<pid>/cmdline names `socket`. */
export function commandLineNamesSocket(args: readonly string[], socket: string): boolean {
  return args.some((arg) => argNamesSocket(arg, socket));
}
