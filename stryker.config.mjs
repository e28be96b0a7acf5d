// Mutation testing of the input rules (issue 8 item 25): `npm run mutation`.
// Not part of `npm test`. Reports go to reports/mutation/ (html and json).
//
// StrykerJS 8 because 9 and later need Node 22; vfiod runs on Node 20.

/** @type {import('@stryker-mutator/api/core').PartialStrykerOptions} */
const config = {
  packageManager: "npm",
  testRunner: "jest",
  jest: {
    projectType: "custom",
    // Only the four unit-test files below, without the suite's summary reporter.
    configFile: "jest.mutation.config.js",
    enableFindRelatedTests: false,
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
