// NBD URIs: the libnbd forms `nbd://HOST[:PORT]/EXPORT` and `nbd+unix:///EXPORT?socket=PATH`
// (NetworkBlockDevice/nbd doc/uri.md), parsed into an address and an export name.
//
// It lives with the client: a URI names an export for a client to reach. The server never
// parses or prints one (it is given a listen address), so nothing here is shared protocol.
//
// Invariants:
// - Parsing is strict: anything that is not one of the two supported forms is a PcacheError
//   'EINVAL' whose message says what was wrong. Schemes we know but do not speak (nbds://,
//   nbds+unix://, nbd+vsock://, ...) are named as unsupported rather than as malformed.
// - The export name is the path after its first '/', percent-decoded as UTF-8; an empty or
//   missing path is the default export "". It fits the protocol's 4096-byte string limit.
// - The port is a decimal 1..65535 (default 10809, the IANA port); the socket path fits a
//   Linux sockaddr_un. Percent-escapes must be well formed and decode to valid UTF-8.
// - formatNbdUri(parseNbdUri(x)) is a canonical form that parses back to the same value.

import path from 'node:path';
import { PcacheError } from '../../lib/errors.js';
import { stringMaxBytes } from '../protocol/constants.js';

/** The IANA-assigned NBD port. */
export const nbdDefaultPort = 10809;
/** sockaddr_un.sun_path is 108 bytes on Linux, including the terminating NUL. */
const socketPathMaxBytes = 107;

export type NbdAddress =
  | { readonly kind: 'tcp'; readonly host: string; readonly port: number }
  | { readonly kind: 'unix'; readonly socketPath: string };

export interface NbdUri {
  readonly address: NbdAddress;
  readonly exportName: string;
}

const textEncoder = new TextEncoder();
const utf8 = new TextDecoder('utf-8', { fatal: true });

/**
 * True when `text` names an NBD URI of any flavour (nbd://, nbds://, nbd+unix://, ...), so a
 * caller can route it to parseNbdUri, which then accepts it or says why not.
 */
export function looksLikeNbdUri(text: string): boolean {
  return /^nbds?(\+[a-z0-9.-]*)?:\/\//i.test(text);
}

/** Parses an NBD URI; anything else is a PcacheError 'EINVAL' naming the problem. */
export function parseNbdUri(text: string): NbdUri {
  const fail = (why: string): never => {
    throw new PcacheError('EINVAL', `bad NBD URI "${text}": ${why}`);
  };
  // Raw whitespace and control characters are never part of a URI; they must be escaped.
  // eslint-disable-next-line no-control-regex
  if (/[\u0000-\u0020\u007f]/.test(text)) fail('spaces and control characters must be percent-encoded');
  const match = /^([A-Za-z][A-Za-z0-9+.-]*):\/\/([^/?#]*)([^?#]*)(\?[^#]*)?(#.*)?$/.exec(text);
  if (match === null) fail('expected nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH');
  const [, schemeText = '', authority = '', pathPart = '', queryPart, fragment] = match ?? [];
  const scheme = schemeText.toLowerCase();
  if (scheme === 'nbds' || scheme.startsWith('nbds+')) fail(`${scheme}:// (NBD over TLS) is not supported; use nbd:// or nbd+unix://`);
  if (scheme !== 'nbd' && scheme !== 'nbd+unix') {
    fail(scheme.startsWith('nbd+') ? `transport ${scheme}:// is not supported; use nbd:// or nbd+unix://` : `unknown scheme ${scheme}://`);
  }
  if (fragment !== undefined) fail('a #fragment is not allowed');
  if (authority.includes('@')) fail('a user name is only meaningful with TLS, which is not supported');
  const exportName = exportNameOf(pathPart, fail);
  const query = parseQuery(queryPart, fail);

  if (scheme === 'nbd+unix') {
    if (authority !== '') fail('nbd+unix:// takes no host: write nbd+unix:///EXPORT?socket=PATH');
    const socketPath = query.get('socket');
    query.delete('socket');
    for (const key of query.keys()) fail(`unknown query parameter "${key}"`);
    if (socketPath === undefined || socketPath === '') fail('nbd+unix:// needs ?socket=PATH');
    const socket = socketPath ?? '';
    if (socket.includes('\u0000')) fail('the socket path contains a NUL byte');
    if (textEncoder.encode(socket).length > socketPathMaxBytes) fail(`the socket path is longer than ${socketPathMaxBytes} bytes`);
    return { address: { kind: 'unix', socketPath: socket }, exportName };
  }

  for (const key of query.keys()) {
    fail(key === 'socket' ? 'socket= belongs to nbd+unix:// URIs' : `unknown query parameter "${key}"`);
  }
  const { host, port } = hostAndPort(authority, fail);
  return { address: { kind: 'tcp', host, port }, exportName };
}

/** The canonical URI for a parsed value (percent-encoding what needs it). */
export function formatNbdUri(uri: NbdUri): string {
  const exportPart = encodeURIComponent(uri.exportName).replace(/%2F/g, '/');
  const address = uri.address;
  if (address.kind === 'unix') {
    return `nbd+unix:///${exportPart}?socket=${encodeURIComponent(address.socketPath).replace(/%2F/g, '/')}`;
  }
  const host = address.host.includes(':') ? `[${address.host}]` : encodeURIComponent(address.host);
  const port = address.port === nbdDefaultPort ? '' : `:${address.port}`;
  return `nbd://${host}${port}/${exportPart}`;
}

/**
 * A short stable description of where an export lives, for identities and messages:
 * `nbd:HOST:PORT/EXPORT` or `nbd:/absolute/socket/path/EXPORT` (IPv6 hosts in brackets).
 */
export function nbdLocation(uri: NbdUri): string {
  const address = uri.address;
  if (address.kind === 'unix') return `nbd:${path.resolve(address.socketPath)}/${uri.exportName}`;
  const host = address.host.includes(':') ? `[${address.host}]` : address.host;
  return `nbd:${host}:${address.port}/${uri.exportName}`;
}

/** How an address reads in messages. */
export function describeAddress(address: NbdAddress): string {
  if (address.kind === 'unix') return address.socketPath;
  return `${address.host.includes(':') ? `[${address.host}]` : address.host}:${address.port}`;
}

function exportNameOf(pathPart: string, fail: (why: string) => never): string {
  if (pathPart === '') return '';
  // The regex guarantees a non-empty path starts with '/'.
  const name = percentDecode(pathPart.slice(1), 'export name', fail);
  if (textEncoder.encode(name).length > stringMaxBytes) fail(`the export name is longer than ${stringMaxBytes} bytes`);
  return name;
}

function parseQuery(queryPart: string | undefined, fail: (why: string) => never): Map<string, string> {
  const query = new Map<string, string>();
  if (queryPart === undefined || queryPart === '?') return query;
  for (const pair of queryPart.slice(1).split('&')) {
    if (pair === '') continue;
    const equals = pair.indexOf('=');
    const key = percentDecode(equals < 0 ? pair : pair.slice(0, equals), 'query parameter name', fail);
    const value = equals < 0 ? '' : percentDecode(pair.slice(equals + 1), `query parameter "${key}"`, fail);
    if (query.has(key)) fail(`query parameter "${key}" is given twice`);
    query.set(key, value);
  }
  return query;
}

function hostAndPort(authority: string, fail: (why: string) => never): { host: string; port: number } {
  let host: string;
  let portText: string | undefined;
  if (authority.startsWith('[')) {
    const close = authority.indexOf(']');
    if (close < 0) fail('unterminated [IPv6] host');
    host = authority.slice(1, close);
    if (!/^[0-9A-Fa-f:.]+$/.test(host) || !host.includes(':')) fail(`"${host}" is not an IPv6 address`);
    const rest = authority.slice(close + 1);
    if (rest !== '' && !rest.startsWith(':')) fail('unexpected text after the [IPv6] host');
    portText = rest === '' ? undefined : rest.slice(1);
  } else {
    const colon = authority.lastIndexOf(':');
    host = percentDecode(colon < 0 ? authority : authority.slice(0, colon), 'host', fail);
    portText = colon < 0 ? undefined : authority.slice(colon + 1);
    if (host.includes(':')) fail('IPv6 hosts must be written in brackets, e.g. nbd://[::1]/');
  }
  if (host === '') fail('nbd:// needs a host (for a Unix socket use nbd+unix:///EXPORT?socket=PATH)');
  if (portText === undefined || portText === '') return { host, port: nbdDefaultPort };
  const port = /^\d{1,5}$/.test(portText) ? Number(portText) : Number.NaN;
  if (!(port >= 1 && port <= 65535)) fail(`port "${portText}" is not a number from 1 to 65535`);
  return { host, port };
}

/** Decodes %XX escapes into bytes, then the bytes as strict UTF-8. */
function percentDecode(text: string, what: string, fail: (why: string) => never): string {
  if (!text.includes('%')) return text;
  const raw = textEncoder.encode(text);
  const bytes = new Uint8Array(raw.length);
  let length = 0;
  for (let i = 0; i < raw.length; i += 1) {
    const byte = raw[i] ?? 0;
    if (byte !== 0x25) {
      bytes[length++] = byte;
      continue;
    }
    const high = hexValue(raw[i + 1]);
    const low = hexValue(raw[i + 2]);
    if (high < 0 || low < 0) fail(`bad percent-escape in the ${what} (expected %XX with two hex digits)`);
    bytes[length++] = high * 16 + low;
    i += 2;
  }
  try {
    return utf8.decode(bytes.subarray(0, length));
  } catch {
    return fail(`the ${what} is not valid UTF-8 once percent-decoded`);
  }
}

/** The value of one ASCII hex digit, or -1. */
function hexValue(byte: number | undefined): number {
  if (byte === undefined) return -1;
  if (byte >= 0x30 && byte <= 0x39) return byte - 0x30;
  const lower = byte | 0x20;
  if (lower >= 0x61 && lower <= 0x66) return lower - 0x61 + 10;
  return -1;
}
