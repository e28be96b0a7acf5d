// Where ../shared (read-only reference material) lives beside the checkout.
// CI has it there (a test needing it fails in CI without it); elsewhere tests that
// need it skip and say why.
import fs from "node:fs";
import path from "node:path";
import { skipOutsideCi } from "./skip";

export const SHARED_DIR = process.env.VFIOD_SHARED_DIR ?? path.resolve(__dirname, "../../../shared");

/**
 * The path of a file under ../shared, or undefined (with the reason logged) when absent.
 * @throws in CI when it is absent (./skip.ts).
 */
export function sharedFile(relative: string): string | undefined {
  const file = path.join(SHARED_DIR, relative);
  if (fs.existsSync(file)) return file;
  skipOutsideCi(`tests of ../shared/${relative}`, `${file} is absent (../shared is not beside this checkout)`);
  return undefined;
}
