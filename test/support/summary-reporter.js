// Prints the closing line CI reads: "N passed, N failed, N skipped". jest prints
// its own summary after every reporter's onRunComplete, so the line is written
// when the process exits, to come last.
const fs = require("node:fs");

class SummaryReporter {
  onRunComplete(_contexts, results) {
    const failed = results.numFailedTests + results.numRuntimeErrorTestSuites;
    const skipped = results.numPendingTests + results.numTodoTests;
    const line = `\n${results.numPassedTests} passed, ${failed} failed, ${skipped} skipped\n`;
    process.once("exit", () => fs.writeSync(2, line));
  }
}
module.exports = SummaryReporter;
