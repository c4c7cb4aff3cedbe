// NBD URIs: the libnbd forms `nbd://HOST[:PORT]/EXPORT` and `nbd+unix:///EXPORT?socket=PATH`,
// and their TLS twins `nbds://` and `nbds+unix://` (NetworkBlockDevice/nbd doc/uri.md), parsed
// into an address, an export name and, for the TLS schemes, what TLS needs: libnbd's query
// parameters `tls-certificates=DIR`, `tls-psk-file=FILE`, `tls-verify-peer=BOOL` and
// `tls-hostname=NAME`, and the PSK username as the URI's user part (`nbds://alice@host/`).
//
// It lives with the client: a URI names an export for a client to reach. The server never
// parses or prints one (it is given a listen address), so nothing here is shared protocol.
//
// Invariants:
// - Parsing is strict: anything that is not one of the supported forms is a PcacheError
//   'EINVAL' whose message says what was wrong. Schemes we know but do not speak (nbd+vsock://,
//   ...) are named as unsupported rather than as malformed. TLS parameters are refused on a
//   plaintext scheme (where libnbd would ignore them: a URI that names credentials but would
//   connect in the clear is a mistake worth saying), and so are combinations that mean nothing:
//   certificates with a PSK file, a user name without a PSK file, tls-verify-peer or
//   tls-hostname with a PSK file.
// - The export name is the path after its first '/', percent-decoded as UTF-8; an empty or
//   missing path is the default export "". It fits the protocol's 4096-byte string limit.
// - The port is a decimal 1..65535 (default 10809, the IANA port); the socket path fits a
//   Linux sockaddr_un. Percent-escapes must be well formed and decode to valid UTF-8.
// - formatNbdUri(parseNbdUri(x)) is a canonical form that parses back to the same value.
// - TLS does not change where an export is: nbdLocation (the backing device's identity) is
//   the same for nbd:// and nbds:// to one export, so turning TLS on needs no --force-backing.

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

/** What an nbds:// URI asks of TLS (nothing is read from the files named here: client/tls.ts does that). */
export interface NbdUriTls {
  /** tls-certificates=DIR: ca-cert.pem checks the server; client-cert.pem and client-key.pem, if there, are presented. */
  readonly certificatesDir?: string;
  /** tls-psk-file=FILE: psktool's `username:hexkey` lines. */
  readonly pskFile?: string;
  /** The PSK username, from the URI's user part (client/tls.ts defaults it to the local user, as libnbd does). */
  readonly username?: string;
  /** tls-verify-peer: check the server's certificate (default true). */
  readonly verifyPeer: boolean;
  /** tls-hostname=NAME: the name the server's certificate must carry (default: the TCP host; none over a Unix socket). */
  readonly hostname?: string;
}

export interface NbdUri {
  readonly address: NbdAddress;
  readonly exportName: string;
  /** Present for nbds:// and nbds+unix://: the connection must be upgraded to TLS. */
  readonly tls?: NbdUriTls;
}

/** The query parameters of TLS, in the order formatNbdUri writes them. */
const tlsParameters = ['tls-certificates', 'tls-psk-file', 'tls-verify-peer', 'tls-hostname'] as const;

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
  const [, schemeText = '', authorityText = '', pathPart = '', queryPart, fragment] = match ?? [];
  const scheme = schemeText.toLowerCase();
  const secure = scheme === 'nbds' || scheme === 'nbds+unix';
  if (scheme !== 'nbd' && scheme !== 'nbd+unix' && !secure) {
    fail(/^nbds?\+/.test(scheme) ? `transport ${scheme}:// is not supported; use nbd://, nbd+unix:// or their TLS forms nbds://, nbds+unix://` : `unknown scheme ${scheme}://`);
  }
  const unixScheme = scheme.endsWith('+unix');
  if (fragment !== undefined) fail('a #fragment is not allowed');
  const at = authorityText.lastIndexOf('@');
  const authority = at < 0 ? authorityText : authorityText.slice(at + 1);
  const username = at < 0 ? undefined : percentDecode(authorityText.slice(0, at), 'user name', fail);
  if (username !== undefined && !secure) fail('a user name is only meaningful with TLS: it is the PSK username of nbds:// with tls-psk-file=');
  const exportName = exportNameOf(pathPart, fail);
  const query = parseQuery(queryPart, fail);
  const tls = secure ? tlsOf(query, username, fail) : undefined;
  for (const key of tlsParameters) {
    if (!secure && query.has(key)) fail(`${key}= needs TLS: use ${unixScheme ? 'nbds+unix' : 'nbds'}://`);
    query.delete(key);
  }
  const withTls = (uri: NbdUri): NbdUri => (tls === undefined ? uri : { ...uri, tls });

  if (unixScheme) {
    if (authority !== '') fail(`${scheme}:// takes no host: write ${scheme}:///EXPORT?socket=PATH`);
    const socketPath = query.get('socket');
    query.delete('socket');
    for (const key of query.keys()) fail(`unknown query parameter "${key}"`);
    if (socketPath === undefined || socketPath === '') fail(`${scheme}:// needs ?socket=PATH`);
    const socket = socketPath ?? '';
    if (socket.includes('\u0000')) fail('the socket path contains a NUL byte');
    if (textEncoder.encode(socket).length > socketPathMaxBytes) fail(`the socket path is longer than ${socketPathMaxBytes} bytes`);
    return withTls({ address: { kind: 'unix', socketPath: socket }, exportName });
  }

  for (const key of query.keys()) {
    fail(key === 'socket' ? `socket= belongs to ${secure ? 'nbds+unix' : 'nbd+unix'}:// URIs` : `unknown query parameter "${key}"`);
  }
  const { host, port } = hostAndPort(authority, fail);
  return withTls({ address: { kind: 'tcp', host, port }, exportName });
}

/** The TLS part of an nbds:// URI: its tls-* parameters and its user name, checked together. */
function tlsOf(query: ReadonlyMap<string, string>, username: string | undefined, fail: (why: string) => never): NbdUriTls {
  const certificatesDir = query.get('tls-certificates');
  const pskFile = query.get('tls-psk-file');
  const verifyText = query.get('tls-verify-peer');
  const hostname = query.get('tls-hostname');
  if (certificatesDir === '') fail('tls-certificates= needs a directory');
  if (pskFile === '') fail('tls-psk-file= needs a file');
  if (hostname === '') fail('tls-hostname= needs a host name');
  if (certificatesDir !== undefined && pskFile !== undefined) fail('tls-certificates= and tls-psk-file= cannot be used together: choose certificates or a pre-shared key');
  if (username !== undefined) {
    if (pskFile === undefined) fail('a user name is the PSK username: it needs tls-psk-file=');
    if (username === '' || username.includes(':')) fail('the PSK user name must be non-empty and without ":"');
  }
  if (pskFile !== undefined && (verifyText !== undefined || hostname !== undefined)) {
    fail('tls-verify-peer= and tls-hostname= concern the server\'s certificate, which a pre-shared key (tls-psk-file=) replaces');
  }
  const verifyPeer = verifyText === undefined ? true : booleanOf(verifyText, fail);
  return {
    verifyPeer,
    ...(certificatesDir === undefined ? {} : { certificatesDir }),
    ...(pskFile === undefined ? {} : { pskFile }),
    ...(username === undefined ? {} : { username }),
    ...(hostname === undefined ? {} : { hostname }),
  };
}

/** libnbd's booleans: 1/true/yes/on and 0/false/no/off; a bare `tls-verify-peer` means true. */
function booleanOf(text: string, fail: (why: string) => never): boolean {
  const value = text.toLowerCase();
  if (value === '' || value === '1' || value === 'true' || value === 'yes' || value === 'on') return true;
  if (value === '0' || value === 'false' || value === 'no' || value === 'off') return false;
  return fail(`tls-verify-peer= takes 1 or 0 (true/false, yes/no, on/off), got "${text}"`);
}

/** The canonical URI for a parsed value (percent-encoding what needs it). */
export function formatNbdUri(uri: NbdUri): string {
  const exportPart = encodePath(uri.exportName);
  const address = uri.address;
  const tls = uri.tls;
  const query: string[] = [];
  if (address.kind === 'unix') query.push(`socket=${encodePath(address.socketPath)}`);
  if (tls?.certificatesDir !== undefined) query.push(`tls-certificates=${encodePath(tls.certificatesDir)}`);
  if (tls?.pskFile !== undefined) query.push(`tls-psk-file=${encodePath(tls.pskFile)}`);
  if (tls?.verifyPeer === false) query.push('tls-verify-peer=false');
  if (tls?.hostname !== undefined) query.push(`tls-hostname=${encodeURIComponent(tls.hostname)}`);
  const queryPart = query.length === 0 ? '' : `?${query.join('&')}`;
  const user = tls?.username === undefined ? '' : `${encodeURIComponent(tls.username)}@`;
  const scheme = tls === undefined ? 'nbd' : 'nbds';
  if (address.kind === 'unix') return `${scheme}+unix://${user}/${exportPart}${queryPart}`;
  const host = address.host.includes(':') ? `[${address.host}]` : encodeURIComponent(address.host);
  const port = address.port === nbdDefaultPort ? '' : `:${address.port}`;
  return `${scheme}://${user}${host}${port}/${exportPart}${queryPart}`;
}

/** Percent-encodes a name or a path, leaving its slashes readable. */
function encodePath(text: string): string {
  return encodeURIComponent(text).replace(/%2F/g, '/');
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
