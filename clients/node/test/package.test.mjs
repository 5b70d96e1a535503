// What ships, and whether the declarations describe the API.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';

import { PKG_DIR } from './helpers.mjs';

const run = promisify(execFile);
const pkg = JSON.parse(fs.readFileSync(path.join(PKG_DIR, 'package.json'), 'utf8'));

let packed = null;
/** `npm pack --dry-run` once: { name, files } of what would be published. */
function packReport() {
  packed ??= (async () => {
    const npm = process.platform === 'win32' ? 'npm.cmd' : 'npm';
    const { stdout } = await run(npm, ['pack', '--dry-run', '--json', '--ignore-scripts'], { cwd: PKG_DIR, maxBuffer: 1 << 24 });
    const [report] = JSON.parse(stdout);
    return { name: report.name, files: report.files.map((f) => f.path).sort() };
  })();
  return packed;
}

test('npm pack ships only the library, its types, README, LICENSE and package.json', async () => {
  const report = await packReport();
  assert.deepEqual(report.files, ['LICENSE', 'README.md', 'index.d.ts', 'index.js', 'package.json']);
  assert.equal(report.name, '@gigacodes/containerflip');
});

test('README: every link works from the npm package too (shipped files, anchors or absolute URLs)', async () => {
  const { files } = await packReport();
  const readme = fs.readFileSync(path.join(PKG_DIR, 'README.md'), 'utf8');
  const targets = [...readme.matchAll(/\]\(([^)\s]+)\)/g)].map((m) => m[1]);
  assert.ok(targets.length > 0);
  const anchors = new Set([...readme.matchAll(/^#+ (.+)$/gm)].map((m) => m[1].toLowerCase()
    .replace(/[^\p{L}\p{N} _-]/gu, '').replace(/ /g, '-')));
  for (const target of targets) {
    if (/^https:\/\//.test(target)) continue;
    if (target.startsWith('#')) {
      assert.ok(anchors.has(target.slice(1)), `${target}: no such heading`);
      continue;
    }
    assert.ok(files.includes(target), `${target} is a relative link to a file npm does not ship`);
  }
});

test('README: the node:cluster recipe is inlined, the same as examples/cluster.mjs', () => {
  const readme = fs.readFileSync(path.join(PKG_DIR, 'README.md'), 'utf8');
  const section = readme.slice(readme.indexOf('### `node:cluster`'));
  const block = /```js\n([\s\S]*?)\n```/.exec(section);
  assert.ok(block, 'a js code block in the node:cluster section');
  // The file minus its leading comment block.
  const lines = fs.readFileSync(path.join(PKG_DIR, 'examples', 'cluster.mjs'), 'utf8').split('\n');
  while (lines[0].startsWith('//')) lines.shift();
  assert.equal(block[1], lines.join('\n').trim());
});

test('package.json: ESM, exports with types, engines, no runtime dependencies, MIT', () => {
  assert.equal(pkg.name, '@gigacodes/containerflip');
  assert.equal(pkg.type, 'module');
  assert.equal(pkg.license, 'MIT');
  assert.equal(pkg.engines.node, '>=18.2');
  assert.equal(pkg.types, './index.d.ts');
  assert.deepEqual(pkg.exports['.'], { types: './index.d.ts', default: './index.js' });
  assert.equal(pkg.dependencies, undefined);
  assert.equal(pkg.peerDependencies, undefined);
  assert.equal(pkg.optionalDependencies, undefined);
  assert.deepEqual(pkg.repository, {
    type: 'git',
    url: 'git+https://github.com/gigacodes/containerflip.git',
    directory: 'clients/node',
  });
  const licence = fs.readFileSync(path.join(PKG_DIR, 'LICENSE'), 'utf8');
  assert.match(licence, /^MIT License/);
  assert.match(licence, /Copyright \(c\) 2026 Fabian Stelzer – Gigacodes GmbH/);
});

test('the library imports nothing but node: built-ins', () => {
  const src = fs.readFileSync(path.join(PKG_DIR, 'index.js'), 'utf8');
  const specifiers = [...src.matchAll(/^\s*import\s[^'"]*['"]([^'"]+)['"]/gm)].map((m) => m[1]);
  assert.ok(specifiers.length > 0);
  for (const s of specifiers) assert.match(s, /^node:/, `${s} is not a built-in`);
});

test('tsc --noEmit: a usage file typechecks against index.d.ts (and misuse does not)', async () => {
  const tsc = path.join(PKG_DIR, 'node_modules', 'typescript', 'bin', 'tsc');
  assert.ok(fs.existsSync(tsc), 'typescript is not installed: run `npm ci` in clients/node first');
  try {
    await run(process.execPath, [tsc, '-p', path.join('test', 'types', 'tsconfig.json')], { cwd: PKG_DIR });
  } catch (err) {
    assert.fail(`tsc failed:\n${err.stdout}${err.stderr}`);
  }
});
