// Where ../shared (read-only reference material) lives beside the checkout.
// CI has it there; elsewhere tests that need it skip and say why.
import fs from "node:fs";
import path from "node:path";

export const SHARED_DIR = process.env.VFIOD_SHARED_DIR ?? path.resolve(__dirname, "../../../shared");

/** The path of a file under ../shared, or undefined (with the reason logged) when absent. */
export function sharedFile(relative: string): string | undefined {
  const file = path.join(SHARED_DIR, relative);
  if (fs.existsSync(file)) return file;
  console.warn(`skipping: ${file} is absent (../shared is not beside this checkout)`);
  return undefined;
}
