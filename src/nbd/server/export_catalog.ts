// ExportCatalog: which exports an NbdServer offers, consulted whenever a client negotiates.
//
// The server never copies the catalog: LIST, INFO, GO, EXPORT_NAME and the meta-context options
// ask it at the moment they are answered, so exports can be added and removed while the server
// runs. A connection resolves its export once, when it enters transmission, and keeps that
// Export until it closes; removing an entry stops new clients from choosing it and leaves
// connected ones alone (NbdServer.disconnect(name) ends those).
//
// An entry may be served elsewhere (`handOff`): when a client's negotiation ends on it, the
// server hands the connection, the negotiated terms and the bytes it read past the handshake
// to the entry's owner instead of serving it (another process serves it: NbdServer.adopt
// there). The entry's Export then only gives the size negotiation advertises.
//
// ExportMap is the mutable catalog the command line keeps; singleExportCatalog is the one-export
// form NbdServer builds from its `export` + `exportName` options.
//
// Invariants:
// - Every name an ExportMap holds is non-empty, well-formed UTF-16 (so its UTF-8 bytes are
//   exactly what a client must send), free of NUL and at most stringMaxBytes in UTF-8; every
//   description fits stringMaxBytes; every size is a safe integer multiple of
//   blockSizeMinimumBytes. add() refuses anything else with PcacheError EINVAL, and refuses a
//   name already present; nothing is changed by a refused add().
// - The default name, when set, may name no entry (the empty name then selects nothing).

import type net from 'node:net';
import { PcacheError } from '../../lib/errors.js';
import { blockSizeMinimumBytes, stringMaxBytes } from '../protocol/constants.js';
import type { ExportDirectory, OfferedExport } from '../protocol/handshake_exports.js';
import type { Export } from './export.js';
import type { NbdRequestObserver } from './observer.js';

/**
 * What a server that hands a connection over has agreed with its client: everything the
 * transmission phase needs to go on where the handshake left off (NbdServer.adopt). Plain
 * data, so that it can cross a process boundary as JSON.
 */
export interface HandedOffTerms {
  /** The catalog name of the export chosen (whatever name the client sent). */
  readonly exportName: string;
  readonly sizeBytes: number;
  /** The transmission flags sent to the client (protocol/constants.ts TransmissionFlag). */
  readonly transmissionFlags: number;
  readonly structuredReplies: boolean;
  /** The id BLOCK_STATUS answers with, when the client selected base:allocation. */
  readonly baseAllocationContextId: number | undefined;
}

/**
 * Takes a connection whose negotiation chose a handed-off export. `socket` is the plaintext
 * socket, not reading, with every handshake reply written to it (or, after STARTTLS, the TLS
 * socket, paused: a TLS session cannot leave the process, so its owner relays it). `leftover`
 * holds the bytes the client sent past the end of negotiation (pipelined requests), in order.
 * The server has let go of the socket: its errors and its closing are the receiver's from now on.
 */
export type HandOff = (socket: net.Socket, terms: HandedOffTerms, leftover: Uint8Array) => void;

export interface ExportEntry {
  readonly name: string;
  readonly description?: string;
  readonly export: Export;
  /** Advertise READ_ONLY and refuse WRITE, TRIM and WRITE_ZEROES with EPERM (default false). */
  readonly readOnly?: boolean;
  /**
   * Told about every request answered on this export's connections instead of the server's
   * observer (per-export metrics); chosen once per connection, so it costs nothing per request.
   */
  readonly observer?: NbdRequestObserver;
  /** Served elsewhere: connections that choose this export go here (see the file comment). */
  readonly handOff?: HandOff;
}

export interface ExportCatalog {
  /** Every export, in the order NBD_OPT_LIST shows them. */
  list(): readonly ExportEntry[];
  /** The export a client named; the empty name picks the default export, if the catalog has one. */
  find(name: string): ExportEntry | undefined;
}

const textEncoder = new TextEncoder();
// ignoreBOM: a leading U+FEFF is part of a name, not a marker to strip.
const textDecoder = new TextDecoder('utf-8', { ignoreBOM: true });

/** A mutable catalog: entries in the order they were added, and an optional default. */
export class ExportMap implements ExportCatalog {
  private readonly entries = new Map<string, ExportEntry>();
  private defaultExportName: string | undefined;

  /** `defaultName`: the export the empty name selects (none when omitted). */
  constructor(options: { readonly defaultName?: string } = {}) {
    this.defaultExportName = options.defaultName;
  }

  /** Offers `entry` to clients from the next option they send. */
  add(entry: ExportEntry): void {
    checkExportEntry(entry, false);
    if (this.entries.has(entry.name)) throw new PcacheError('EINVAL', `an export named "${entry.name}" already exists`);
    this.entries.set(entry.name, entry);
  }

  /**
   * Stops offering the export named `name` and returns its entry (undefined when there was
   * none). Connections already serving it keep it until they close or are disconnected.
   */
  remove(name: string): ExportEntry | undefined {
    const entry = this.entries.get(name);
    this.entries.delete(name);
    return entry;
  }

  /** The export the empty name selects, or undefined for none. */
  get defaultName(): string | undefined {
    return this.defaultExportName;
  }

  set defaultName(name: string | undefined) {
    this.defaultExportName = name;
  }

  get size(): number {
    return this.entries.size;
  }

  list(): readonly ExportEntry[] {
    return [...this.entries.values()];
  }

  find(name: string): ExportEntry | undefined {
    if (name === '') return this.defaultExportName === undefined ? undefined : this.entries.get(this.defaultExportName);
    return this.entries.get(name);
  }
}

/**
 * The catalog of a server with one export, which answers to its own name and to the empty
 * name. The name may itself be empty (`--export-name ''`); the entry is checked here.
 */
export function singleExportCatalog(entry: ExportEntry): ExportCatalog {
  checkExportEntry(entry, true);
  const entries = [entry];
  return {
    list: () => entries,
    find: (name) => (name === '' || name === entry.name ? entry : undefined),
  };
}

/** What a server's handshake sees of a catalog entry: the facts it sends, and the Export to serve. */
export interface ServedExport extends OfferedExport {
  readonly target: Export;
  readonly observer: NbdRequestObserver | undefined;
  readonly handOff: HandOff | undefined;
}

/**
 * The catalog as the handshake codec's ExportDirectory. Entries are translated when asked
 * (negotiation only, never per request), so the size is the Export's size at that moment.
 */
export function catalogDirectory(catalog: ExportCatalog): ExportDirectory<ServedExport> {
  return {
    list: () => catalog.list().map(served),
    find: (name) => {
      const entry = catalog.find(name);
      return entry === undefined ? undefined : served(entry);
    },
  };
}

function served(entry: ExportEntry): ServedExport {
  return {
    name: entry.name,
    description: entry.description,
    sizeBytes: entry.export.sizeBytes,
    readOnly: entry.readOnly ?? false,
    target: entry.export,
    observer: entry.observer,
    handOff: entry.handOff,
  };
}

/** Refuses (PcacheError EINVAL) an entry that the protocol cannot carry or serve. */
function checkExportEntry(entry: ExportEntry, emptyNameAllowed: boolean): void {
  const name = entry.name;
  if (name === '' && !emptyNameAllowed) throw new PcacheError('EINVAL', 'an export name must not be empty');
  checkProtocolString(name, 'export name');
  if (entry.description !== undefined) checkProtocolString(entry.description, `description of export "${name}"`);
  const size = entry.export.sizeBytes;
  if (!Number.isSafeInteger(size) || size < 0 || size % blockSizeMinimumBytes !== 0) {
    throw new PcacheError('EINVAL', `export size ${size} is not a multiple of ${blockSizeMinimumBytes} bytes`);
  }
}

/** A protocol string (proto.md "Conventions"): UTF-8 a client can send back, no NUL, at most 4096 bytes. */
function checkProtocolString(text: string, what: string): void {
  const bytes = textEncoder.encode(text);
  if (bytes.length > stringMaxBytes) throw new PcacheError('EINVAL', `${what} longer than ${stringMaxBytes} bytes`);
  if (text.includes('\0')) throw new PcacheError('EINVAL', `${what} contains a NUL character`);
  // A lone surrogate would be encoded as U+FFFD: the name on the wire would not be this one.
  if (textDecoder.decode(bytes) !== text) throw new PcacheError('EINVAL', `${what} is not well-formed Unicode`);
}
