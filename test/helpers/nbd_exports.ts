// Export directories for handshake-codec tests: the codec asks a directory for the exports it
// offers (protocol/handshake_server.ts); these build one from plain facts, with no server.

import type { ExportDirectory, OfferedExport } from '../../src/nbd/protocol/handshake_exports.js';

/** A directory of `offered`, in that order; the empty name picks `defaultName` (none when omitted). */
export function exportsOf(offered: readonly OfferedExport[], defaultName?: string): ExportDirectory<OfferedExport> {
  return {
    list: () => offered,
    find: (name) => offered.find((entry) => entry.name === (name === '' ? defaultName : name)),
  };
}

/** One export that answers to its name and to the empty name, as a one-export server's does. */
export function oneExport(name: string, sizeBytes: number, options: { description?: string; readOnly?: boolean } = {}): ExportDirectory<OfferedExport> {
  return exportsOf([{ name, description: options.description, sizeBytes, readOnly: options.readOnly ?? false }], name);
}
