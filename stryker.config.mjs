// Mutation testing of the input rules (issue 8 item 25): `npm run mutation`.
// Not part of `npm test`. Reports go to reports/mutation/ (html and json).
//
// StrykerJS 8 because 9 and later need Node 22; vfiod runs on Node 20.
//
// Equivalent mutants: none survive today (350 of 350 killed). Two pieces of
// redundant code whose mutants were equivalent were removed rather than listed:
// - src/inventory/resolve.ts notFound: `ref.length < MIN_PREFIX && ...` became
//   just the `vms.some(...)` test. notFound runs only after the prefix tier found
//   nothing, so a ref of 3+ characters never has a prefix-matchable id starting
//   with it; ConditionalExpression (-> true) and EqualityOperator (< -> <=) on the
//   length test could not change the outcome.
// - src/host/device-allow-list.ts readId: the `value?.replace(...) ?? ""` helper
//   (OptionalChaining and the "" fallback only served noUncheckedIndexedAccess;
//   the values are always strings) and `catch { return undefined; }`
//   (BlockStatement -> {} returns undefined all the same) became a typed
//   Promise.all pair with `.then(..., () => undefined)`.
// If a change brings an equivalent survivor back, name it here: file, line,
// mutator, and why no test can tell it apart.

/** @type {import('@stryker-mutator/api/core').PartialStrykerOptions} */
const config = {
  packageManager: "npm",
  testRunner: "jest",
  jest: {
    projectType: "custom",
    // Only the four unit-test files, without the suite's summary reporter.
    configFile: "jest.mutation.config.js",
    // Each mutant loads only the test files that import its module: a third less CPU.
    enableFindRelatedTests: true,
  },
  coverageAnalysis: "perTest",
  // No type checker: ts-jest runs with diagnostics off, so a mutant that does not
  // type-check still runs (and is killed or survives on behaviour alone).
  checkers: [],
  mutate: ["src/pci/address.ts", "src/device-id.ts", "src/inventory/resolve.ts", "src/host/device-allow-list.ts"],
  reporters: ["clear-text", "progress", "html", "json"],
  concurrency: 2,
  timeoutMS: 10000,
  tempDirName: ".stryker-tmp",
  cleanTempDir: true,
};

export default config;
