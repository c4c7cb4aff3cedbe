// An ESLint plugin with one rule, `no-import-cycle`: no module may reach itself through its
// relative imports, type-only imports included.
//
// Why our own: eslint-plugin-import's no-cycle skips `import type`, and a circle of type-only
// imports is still a knot in the design (the engine once had one: every part imported the
// type of a core object that imported the types of every part). The rule reads the import
// statements of the files it reaches straight from disk (relative specifiers only, `.js`
// written for the `.ts` file as NodeNext wants), so it needs no type information. A graph is
// built once per lint run and shared by every file; files do not change during a run.

import fs from 'node:fs';
import path from 'node:path';

const importPattern = /(?:^|\n)\s*(?:import|export)\b[^'";]*?\bfrom\s*'(\.{1,2}\/[^']+)'|\bimport\(\s*'(\.{1,2}\/[^']+)'\s*\)/g;
const edges = new Map();

/** The relative imports of `file`, resolved to .ts files that exist. */
function importsOf(file) {
  let targets = edges.get(file);
  if (targets !== undefined) return targets;
  targets = [];
  edges.set(file, targets);
  let text;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch {
    return targets;
  }
  for (const match of text.matchAll(importPattern)) {
    const specifier = match[1] ?? match[2];
    const resolved = path.resolve(path.dirname(file), specifier.replace(/\.js$/, '.ts'));
    if (resolved.endsWith('.ts') && fs.existsSync(resolved)) targets.push({ specifier, file: resolved });
  }
  return targets;
}

/** A path of files from `start` back to `goal`, or undefined. */
function pathBack(start, goal, seen) {
  if (start === goal) return [goal];
  if (seen.has(start)) return undefined;
  seen.add(start);
  for (const next of importsOf(start)) {
    const rest = pathBack(next.file, goal, seen);
    if (rest !== undefined) return [start, ...rest];
  }
  return undefined;
}

const noImportCycle = {
  meta: {
    type: 'problem',
    docs: { description: 'forbid import cycles, type-only imports included' },
    schema: [],
    messages: { cycle: 'import cycle: {{cycle}}' },
  },
  create(context) {
    const file = path.resolve(context.filename);
    const root = context.cwd;
    const seen = new Set();
    const check = (node) => {
      const specifier = node.source?.value;
      if (typeof specifier !== 'string' || !specifier.startsWith('.')) return;
      const target = path.resolve(path.dirname(file), specifier.replace(/\.js$/, '.ts'));
      const cycle = pathBack(target, file, seen);
      if (cycle === undefined) return;
      const shown = [file, ...cycle].map((entry) => path.relative(root, entry)).join(' -> ');
      context.report({ node, messageId: 'cycle', data: { cycle: shown } });
    };
    return { ImportDeclaration: check, ExportNamedDeclaration: check, ExportAllDeclaration: check, ImportExpression: check };
  },
};

export default { rules: { 'no-import-cycle': noImportCycle } };
