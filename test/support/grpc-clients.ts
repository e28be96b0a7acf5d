// Clients for the standard services vfiod serves beside its own: health and
// server reflection (v1, v1alpha), loaded from the packages' own proto files.
import * as grpc from "@grpc/grpc-js";
import { fromBinary } from "@bufbuild/protobuf";
import { FileDescriptorProtoSchema, type FileDescriptorProto } from "@bufbuild/protobuf/wkt";
import * as protoLoader from "@grpc/proto-loader";
import { protoPath as healthProtoPath } from "grpc-health-check";
import path from "node:path";

type Loaded = Record<string, unknown>;

function serviceClient(protoFile: string, fullName: string, address: string): grpc.Client {
  const pkg = grpc.loadPackageDefinition(protoLoader.loadSync(protoFile, { keepCase: true, enums: String })) as Loaded;
  const ctor = fullName.split(".").reduce<unknown>((node, part) => (node as Loaded)[part], pkg) as grpc.ServiceClientConstructor;
  return new ctor(address, grpc.credentials.createInsecure());
}

/** grpc.health.v1.Health/Check → "SERVING" | "NOT_SERVING" | ... */
export function checkHealth(address: string, service: string): Promise<string> {
  const client = serviceClient(healthProtoPath, "grpc.health.v1.Health", address);
  return new Promise((resolve, reject) => {
    (client as unknown as { check: Function }).check({ service }, { deadline: Date.now() + 5000 }, (err: Error | null, res: { status: string }) => {
      client.close();
      if (err) reject(err);
      else resolve(res.status);
    });
  });
}

const REFLECTION_PROTO = (version: "v1" | "v1alpha") =>
  path.join(path.dirname(require.resolve("@grpc/reflection/package.json")), `build/proto/grpc/reflection/${version}/reflection.proto`);

/** One request on grpc.reflection.<version>.ServerReflection/ServerReflectionInfo. */
export function reflect(address: string, version: "v1" | "v1alpha", request: Record<string, string>): Promise<Loaded> {
  const client = serviceClient(REFLECTION_PROTO(version), `grpc.reflection.${version}.ServerReflection`, address);
  return new Promise((resolve, reject) => {
    const call = (client as unknown as { ServerReflectionInfo: () => grpc.ClientDuplexStream<unknown, Loaded> }).ServerReflectionInfo();
    call.once("data", (response: Loaded) => {
      call.end();
      client.close();
      resolve(response);
    });
    call.once("error", reject);
    call.write(request);
  });
}

/** The files of one reflection request answered with a file_descriptor_response, decoded. */
export async function reflectFiles(
  address: string,
  version: "v1" | "v1alpha",
  request: Record<string, string>,
): Promise<FileDescriptorProto[]> {
  const response = await reflect(address, version, request);
  const files = response.file_descriptor_response as { file_descriptor_proto: Buffer[] } | undefined;
  if (files === undefined) throw new Error(`reflection ${version} ${JSON.stringify(request)}: ${JSON.stringify(response.error_response)}`);
  return files.file_descriptor_proto.map((bytes) => fromBinary(FileDescriptorProtoSchema, bytes));
}
