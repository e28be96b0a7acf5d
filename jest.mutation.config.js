// Jest config for `npm run mutation` (stryker.config.json): only the unit tests
// of the four input-rule modules, without the suite's summary reporter.
const base = require("./jest.config.js");

/** @type {import('jest').Config} */
module.exports = {
  ...base,
  testMatch: [
    "<rootDir>/test/pci/address.test.ts",
    "<rootDir>/test/device-id.test.ts",
    "<rootDir>/test/inventory/resolve.test.ts",
    "<rootDir>/test/host/device-allow-list.test.ts",
  ],
  reporters: ["default"],
};
