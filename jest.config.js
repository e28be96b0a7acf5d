/** @type {import('jest').Config} */
module.exports = {
  testEnvironment: "node",
  roots: ["<rootDir>/test"],
  testMatch: ["**/*.test.ts"],
  transform: { "^.+\\.ts$": ["ts-jest", { tsconfig: "tsconfig.json", diagnostics: false }] },
  reporters: ["default", "<rootDir>/test/support/summary-reporter.js"],
  // Real QEMU and real sockets: give slow machines room, per test.
  testTimeout: 60000,
  maxWorkers: 2,
};
