// The exports a server handshake offers, as the codec sees them: what it tells a client about
// one (OfferedExport), where it looks them up (ExportDirectory, which the server implements over
// its catalog), and the byte forms of what it says about them. handshake_server.ts decides
// when to ask; this module says how a wire name becomes a lookup and how an export is described.
//
// Invariants:
// - A name from the wire is looked up only as the exact UTF-8 string its bytes encode; bytes
//   that are not UTF-8 match no export, and a leading U+FEFF is part of the name.
// - Names and descriptions an owner offers fit stringMaxBytes (asserted when encoded: the
//   owner checks them when it accepts an export, export_catalog.ts on the server).

import { assert } from '../../lib/assert.js';
import { writeU32BE } from './bytes.js';
import { stringMaxBytes } from './constants.js';
import { exportNameBytes } from './handshake.js';

/** What negotiation tells a client about one export. */
export interface OfferedExport {
  /** UTF-8, at most stringMaxBytes, no NUL: the owner checks this before offering it. */
  readonly name: string;
  readonly description: string | undefined;
  /** A safe integer multiple of blockSizeMinimumBytes, read when a client asks. */
  readonly sizeBytes: number;
  readonly readOnly: boolean;
}

/** The exports a handshake picks from, asked at every option that needs them (never cached). */
export interface ExportDirectory<E extends OfferedExport> {
  /** Every export, in the order LIST shows them. */
  list(): readonly E[];
  /** The export named `name`; the empty name is the default export, if there is one. */
  find(name: string): E | undefined;
}

const textEncoder = new TextEncoder();
// fatal: bytes that are not UTF-8 name no export; ignoreBOM: a leading U+FEFF is part of the name.
const nameDecoder = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true });
/** Names up to this long are quoted back in ERR_UNKNOWN messages; longer ones are not. */
const quotedNameMaxBytes = 256;

/** The export the name bytes from the wire select, or undefined. */
export function findExport<E extends OfferedExport>(directory: ExportDirectory<E>, name: Uint8Array): E | undefined {
  const text = decodeName(name);
  return text === undefined ? undefined : directory.find(text);
}

/** The human-readable text of an ERR_UNKNOWN for the name bytes a client sent. */
export function unknownExportMessage(name: Uint8Array): string {
  if (name.length === 0) return 'this server has no default export: name one';
  const text = name.length <= quotedNameMaxBytes ? decodeName(name) : undefined;
  return text === undefined ? 'no such export' : `no export named "${text}"`;
}

/** The data of one NBD_REP_SERVER reply to LIST: u32 name length, name, then the description. */
export function serverReplyData(offered: OfferedExport): Uint8Array {
  const name = exportNameBytes(offered.name);
  const description = descriptionBytes(offered);
  const data = new Uint8Array(4 + name.length + description.length);
  writeU32BE(data, 0, name.length);
  data.set(name, 4);
  data.set(description, 4 + name.length);
  return data;
}

/** The description as UTF-8; empty when there is none. */
export function descriptionBytes(offered: OfferedExport): Uint8Array {
  if (offered.description === undefined) return new Uint8Array(0);
  const bytes = textEncoder.encode(offered.description);
  assert(bytes.length <= stringMaxBytes, 'description longer than the protocol allows');
  return bytes;
}

/** A name from the wire as a string, or undefined when its bytes are not UTF-8. */
function decodeName(name: Uint8Array): string | undefined {
  try {
    return nameDecoder.decode(name);
  } catch {
    return undefined;
  }
}
