// The package's version, from package.json, for `pcache --version` and the control socket's `GET /`.

import fs from 'node:fs';

export function packageVersion(): string {
  // dist/src/cli/version.js -> the package root, both in this repository and when installed.
  const text = fs.readFileSync(new URL('../../../package.json', import.meta.url), 'utf8');
  const version = (JSON.parse(text) as { version?: unknown }).version;
  return typeof version === 'string' ? version : 'unknown';
}
