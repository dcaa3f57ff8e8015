// Compiles crates/dalp-indexed/tests/contracts/DalpTestToken.sol with solc from npm and writes
// the creation bytecode next to it (committed, so tests need neither solc nor OpenZeppelin).
// Usage: npm install --prefix .tools solc@0.8.28 @openzeppelin/contracts@5
//        NODE_PATH=.tools/node_modules node scripts/build-test-token.mjs
import { createRequire } from "node:module";
import { readFileSync, writeFileSync, existsSync } from "node:fs";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";

const require = createRequire(join(process.cwd(), ".tools", "node_modules", "x.js"));
const solc = require("solc");
const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const dir = join(root, "crates", "dalp-indexed", "tests", "contracts");
const modules = join(process.cwd(), ".tools", "node_modules");

const input = {
  language: "Solidity",
  sources: { "DalpTestToken.sol": { content: readFileSync(join(dir, "DalpTestToken.sol"), "utf8") } },
  settings: { optimizer: { enabled: true, runs: 200 }, outputSelection: { "*": { "*": ["evm.bytecode.object"] } } },
};
function findImports(path) {
  const file = join(modules, path);
  return existsSync(file) ? { contents: readFileSync(file, "utf8") } : { error: `not found: ${path}` };
}
const out = JSON.parse(solc.compile(JSON.stringify(input), { import: findImports }));
const errors = (out.errors || []).filter((e) => e.severity === "error");
if (errors.length) {
  for (const e of errors) console.error(e.formattedMessage);
  process.exit(1);
}
const bin = out.contracts["DalpTestToken.sol"].DalpTestToken.evm.bytecode.object;
writeFileSync(join(dir, "DalpTestToken.bin"), bin + "\n");
console.log(`wrote DalpTestToken.bin (${bin.length / 2} bytes, solc ${solc.version()})`);
