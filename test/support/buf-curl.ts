// buf curl (the buf CLI from node_modules, offline) as a reflection-only gRPC client:
// no proto files, so every schema it uses comes from vfiod's server reflection, as
// for grpcurl.
import { fromBinary } from "@bufbuild/protobuf";
import { execFile } from "node:child_process";
import path from "node:path";
import { ErrorInfoSchema, type ErrorInfo } from "../../gen/google/rpc/error_details_pb";

const BUF = path.resolve(__dirname, "../../node_modules/.bin/buf");

export interface BufCurlResult {
  /** buf's exit status: 0, or 8 × the gRPC code for an RPC error, or 1 when buf itself fails. */
  readonly exitCode: number;
  readonly stdout: string;
  readonly stderr: string;
}

/** `buf curl --protocol grpc --http2-prior-knowledge <args>`, over plaintext HTTP/2. */
export function bufCurl(args: string[]): Promise<BufCurlResult> {
  return new Promise((resolve, reject) => {
    execFile(
      BUF,
      ["curl", "--protocol", "grpc", "--http2-prior-knowledge", ...args],
      { timeout: 30_000 },
      (err, stdout, stderr) => {
        if (err && typeof err.code !== "number") reject(err);
        else resolve({ exitCode: err ? (err.code as number) : 0, stdout, stderr });
      },
    );
  });
}

/** One unary call of `http://<address>/<method>` with a JSON request body. */
export function bufCurlCall(address: string, method: string, request: unknown): Promise<BufCurlResult> {
  return bufCurl(["-d", JSON.stringify(request), `http://${address}/${method}`]);
}

/** An RPC error as buf curl prints it on stderr (Connect's JSON error shape). */
export interface BufCurlError {
  /** Lower snake case: "invalid_argument". */
  readonly code: string;
  readonly message: string;
  /** Each google.rpc.ErrorInfo among the details, decoded. */
  readonly errorInfos: ErrorInfo[];
}

export function parseBufCurlError(stderr: string): BufCurlError {
  const printed = JSON.parse(stderr) as { code: string; message: string; details?: { type: string; value: string }[] };
  const errorInfos = (printed.details ?? [])
    .filter((detail) => detail.type === "google.rpc.ErrorInfo")
    .map((detail) => fromBinary(ErrorInfoSchema, Buffer.from(detail.value, "base64")));
  return { code: printed.code, message: printed.message, errorInfos };
}
