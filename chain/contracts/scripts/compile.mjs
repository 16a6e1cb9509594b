// Compiles settlement.tolk with the pinned @ton/tolk-js and writes
// build/settlement.boc (code cell BOC) and build/settlement.hash (hex code
// hash). With --check it recompiles and fails if the committed files differ.
import { runTolkCompiler, getTolkCompilerVersion } from '@ton/tolk-js';
import { readFileSync, writeFileSync, mkdirSync, existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const bocPath = join(root, 'build', 'settlement.boc');
const hashPath = join(root, 'build', 'settlement.hash');
const check = process.argv.includes('--check');

const result = await runTolkCompiler({
  entrypointFileName: 'settlement.tolk',
  fsReadCallback: (path) => readFileSync(join(root, path), 'utf-8'),
});
if (result.status === 'error') {
  console.error(result.message);
  process.exit(1);
}
const boc = Buffer.from(result.codeBoc64, 'base64');
const hash = result.codeHashHex.toLowerCase();

if (check) {
  if (!existsSync(bocPath) || !existsSync(hashPath)) {
    console.error('build/settlement.boc or build/settlement.hash is missing: run `npm run build` and commit them');
    process.exit(1);
  }
  const committedHash = readFileSync(hashPath, 'utf-8').trim();
  const committedBoc = readFileSync(bocPath);
  if (committedHash !== hash || !committedBoc.equals(boc)) {
    console.error(`settlement code changed: committed ${committedHash}, compiled ${hash}; run \`npm run build\` and commit build/`);
    process.exit(1);
  }
  console.log(`settlement code hash ${hash} matches (Tolk ${await getTolkCompilerVersion()})`);
} else {
  mkdirSync(dirname(bocPath), { recursive: true });
  writeFileSync(bocPath, boc);
  writeFileSync(hashPath, hash + '\n');
  console.log(`wrote build/settlement.boc (${boc.length} bytes), code hash ${hash}`);
}
