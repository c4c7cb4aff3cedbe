// Lint rules for the whole tree. Type-aware rules run on src/, sim/, test/ and bench/; the plain
// JavaScript helper scripts get the recommended set only. The layering of src/ (docs/design.md,
// "Module map") is checked here: no import cycles, and each layer imports only the layers below.
import js from '@eslint/js';
import tseslint from 'typescript-eslint';
import importCycles from './scripts/eslint_import_cycles.mjs';

/** Product code never imports the simulator, the tests or the benchmarks. */
const outsideProduct = ['**/sim/**', '**/test/**', '**/bench/**'];

/** A layer of src/: its files may not import what `forbidden` matches (import specifiers, gitignore style). */
function layer(files, forbidden, why) {
  return {
    files,
    rules: {
      'no-restricted-imports': ['error', { patterns: [{ group: [...forbidden, ...outsideProduct], message: why }] }],
    },
  };
}

export default tseslint.config(
  { ignores: ['dist/**', 'node_modules/**', 'pcache-data/**', 'reports/**', '.stryker-tmp/**'] },
  js.configs.recommended,
  {
    files: ['**/*.ts', '**/*.cts'],
    extends: [...tseslint.configs.strictTypeChecked],
    languageOptions: {
      parserOptions: { projectService: true, tsconfigRootDir: import.meta.dirname },
    },
    rules: {
      '@typescript-eslint/restrict-template-expressions': ['error', { allowNumber: true, allowBoolean: true }],
      '@typescript-eslint/no-unnecessary-condition': ['error', { allowConstantLoopConditions: true }],
      '@typescript-eslint/no-confusing-void-expression': 'off',
      '@typescript-eslint/no-invalid-void-type': 'off',
      '@typescript-eslint/no-non-null-assertion': 'error',
      '@typescript-eslint/no-explicit-any': 'error',
      '@typescript-eslint/switch-exhaustiveness-check': 'error',
      'no-console': 'error',
      eqeqeq: 'error',
    },
  },
  {
    // No import cycles anywhere in the TypeScript tree, type-only imports included.
    files: ['**/*.ts'],
    plugins: { pcache: importCycles },
    rules: { 'pcache/no-import-cycle': 'error' },
  },
  layer(['src/lib/**/*.ts'], ['../**'], 'src/lib is the bottom layer: it imports nothing else of pcache'),
  layer(['src/ondisk/**/*.ts'], ['../cache/**', '../device/**', '../nbd/**', '../cli/**'], 'src/ondisk imports only src/lib'),
  layer(['src/device/**/*.ts'], ['../cache/**', '../ondisk/**', '../nbd/**', '../cli/**'], 'src/device imports only src/lib'),
  layer(['src/cache/**/*.ts'], ['../nbd/**', '../cli/**'], 'the cache never sees the NBD layer or the command line'),
  layer(['src/nbd/**/*.ts'], ['**/cache/**', '**/device/**', '**/ondisk/**', '**/cli/**'], 'the NBD layer imports only src/lib: it never knows the cache'),
  layer(['src/nbd/protocol/**/*.ts'], ['**/cache/**', '**/device/**', '**/ondisk/**', '**/cli/**', '../server/**', '../client/**'], 'the NBD protocol codec is shared by server and client and imports neither'),
  layer(['src/nbd/server/**/*.ts'], ['**/cache/**', '**/device/**', '**/ondisk/**', '**/cli/**', '../client/**'], 'the NBD server never imports the NBD client'),
  layer(['src/nbd/client/**/*.ts'], ['**/cache/**', '**/device/**', '**/ondisk/**', '**/cli/**', '../server/**'], 'the NBD client never imports the NBD server'),
  layer(['src/cli/**/*.ts', 'src/index.ts'], [], 'product code never imports the simulator, the tests or the benchmarks'),
  {
    // Only the command line talks to the terminal; tests, benchmarks and scripts report too.
    files: ['src/cli/**', 'test/**', 'bench/**', 'scripts/**'],
    rules: { 'no-console': 'off' },
  },
  {
    files: ['test/**/*.ts', 'bench/**/*.ts'],
    rules: {
      // node:test's describe/it return promises that the runner tracks itself.
      '@typescript-eslint/no-floating-promises': 'off',
    },
  },
  {
    files: ['**/*.js', '**/*.mjs'],
    languageOptions: {
      globals: { process: 'readonly', console: 'readonly', URL: 'readonly', setTimeout: 'readonly' },
    },
  },
);
