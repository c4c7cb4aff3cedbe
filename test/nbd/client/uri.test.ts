// NBD URIs: the two libnbd forms parse to the right address and export (with defaults and
// percent-decoding), format back to a URI that parses to the same value, and everything else
// — other transports included — is refused with an EINVAL that says why (the TLS forms:
// test/nbd/client/uri_tls.test.ts).

import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { PcacheError } from '../../../src/lib/errors.js';
import { formatNbdUri, looksLikeNbdUri, nbdLocation, parseNbdUri, type NbdUri } from '../../../src/nbd/client/uri.js';

const good: [string, NbdUri][] = [
  ['nbd://example.com', { address: { kind: 'tcp', host: 'example.com', port: 10809 }, exportName: '' }],
  ['nbd://example.com/', { address: { kind: 'tcp', host: 'example.com', port: 10809 }, exportName: '' }],
  ['nbd://example.com:10810/disk', { address: { kind: 'tcp', host: 'example.com', port: 10810 }, exportName: 'disk' }],
  ['nbd://127.0.0.1:1/a/b', { address: { kind: 'tcp', host: '127.0.0.1', port: 1 }, exportName: 'a/b' }],
  ['nbd://[::1]:65535/x', { address: { kind: 'tcp', host: '::1', port: 65535 }, exportName: 'x' }],
  ['nbd://[fe80::1]/', { address: { kind: 'tcp', host: 'fe80::1', port: 10809 }, exportName: '' }],
  ['NBD://Host/E', { address: { kind: 'tcp', host: 'Host', port: 10809 }, exportName: 'E' }],
  ['nbd://h//leading-slash', { address: { kind: 'tcp', host: 'h', port: 10809 }, exportName: '/leading-slash' }],
  ['nbd://h/with%20space%2Fand%25', { address: { kind: 'tcp', host: 'h', port: 10809 }, exportName: 'with space/and%' }],
  ['nbd://h/%C3%A9t%C3%A9', { address: { kind: 'tcp', host: 'h', port: 10809 }, exportName: 'été' }],
  ['nbd://h/été', { address: { kind: 'tcp', host: 'h', port: 10809 }, exportName: 'été' }],
  ['nbd+unix:///?socket=/tmp/nbd.sock', { address: { kind: 'unix', socketPath: '/tmp/nbd.sock' }, exportName: '' }],
  ['nbd+unix:///disk?socket=/run/a%20b.sock', { address: { kind: 'unix', socketPath: '/run/a b.sock' }, exportName: 'disk' }],
  ['nbd+unix:///e%3Fx?socket=relative.sock', { address: { kind: 'unix', socketPath: 'relative.sock' }, exportName: 'e?x' }],
  ['nbd+unix://?socket=/s', { address: { kind: 'unix', socketPath: '/s' }, exportName: '' }],
];

const bad: [string, RegExp][] = [
  ['', /expected nbd:\/\/HOST/],
  ['/dev/sdb', /expected nbd:\/\/HOST/],
  ['nbd:/host/export', /expected nbd:\/\/HOST/],
  ['nbds://host/export?tls-certificates=/c&tls-psk-file=/k', /cannot be used together/],
  ['nbds+unix:///?socket=/s&tls-verify-peer=maybe', /tls-verify-peer= takes 1 or 0/],
  ['nbd+vsock://2/export', /transport nbd\+vsock:\/\/ is not supported/],
  ['nbd+ssh://host/export', /transport nbd\+ssh:\/\/ is not supported/],
  ['http://host/export', /unknown scheme http:\/\//],
  ['nbd:///export', /needs a host/],
  ['nbd://host:0/', /port "0" is not a number from 1 to 65535/],
  ['nbd://host:65536/', /port "65536"/],
  ['nbd://host:abc/', /port "abc"/],
  ['nbd://host:+1/', /port "\+1"/],
  ['nbd://::1/', /IPv6 hosts must be written in brackets/],
  ['nbd://[::1/', /unterminated \[IPv6\] host/],
  ['nbd://[example.com]/', /is not an IPv6 address/],
  ['nbd://[::1]x/', /unexpected text after the \[IPv6\] host/],
  ['nbd://user@host/', /user name is only meaningful with TLS/],
  ['nbd://host/e#frag', /#fragment is not allowed/],
  ['nbd://host/e?socket=/s', /socket= belongs to nbd\+unix/],
  ['nbd://host/e?tls=on', /unknown query parameter "tls"/],
  ['nbd://host/a b', /spaces and control characters must be percent-encoded/],
  ['nbd://host/%zz', /bad percent-escape in the export name/],
  ['nbd://host/%4', /bad percent-escape/],
  ['nbd://host/%ff%fe', /not valid UTF-8/],
  [`nbd://host/${'x'.repeat(4097)}`, /export name is longer than 4096 bytes/],
  ['nbd+unix:///export', /needs \?socket=PATH/],
  ['nbd+unix:///export?socket=', /needs \?socket=PATH/],
  ['nbd+unix://host/?socket=/s', /takes no host/],
  ['nbd+unix:///?socket=/a&socket=/b', /"socket" is given twice/],
  ['nbd+unix:///?socket=/s&other=1', /unknown query parameter "other"/],
  ['nbd+unix:///?socket=/s%00x', /NUL byte/],
  [`nbd+unix:///?socket=/${'s'.repeat(107)}`, /longer than 107 bytes/],
];

describe('NBD URIs', () => {
  for (const [text, expected] of good) {
    it(`parses ${text.length > 60 ? `${text.slice(0, 60)}...` : text}`, () => {
      const parsed = parseNbdUri(text);
      assert.deepEqual(parsed, expected);
      assert.ok(looksLikeNbdUri(text));
      // The canonical form parses back to the same value.
      assert.deepEqual(parseNbdUri(formatNbdUri(parsed)), parsed, `round trip through ${formatNbdUri(parsed)}`);
    });
  }

  for (const [text, message] of bad) {
    it(`refuses ${JSON.stringify(text.length > 60 ? `${text.slice(0, 60)}...` : text)} with EINVAL`, () => {
      assert.throws(() => parseNbdUri(text), (error: unknown) => {
        assert.ok(error instanceof PcacheError, 'a PcacheError');
        assert.equal(error.code, 'EINVAL');
        assert.match(error.message, message);
        return true;
      });
    });
  }

  it('formats canonical URIs: default port left out, IPv6 in brackets, reserved characters escaped', () => {
    assert.equal(formatNbdUri(parseNbdUri('nbd://h:10809/a%20b/c')), 'nbd://h/a%20b/c');
    assert.equal(formatNbdUri(parseNbdUri('nbd://[::1]:99/')), 'nbd://[::1]:99/');
    assert.equal(formatNbdUri(parseNbdUri('nbd+unix:///e%3Fx?socket=/run/a%26b')), 'nbd+unix:///e%3Fx?socket=/run/a%26b');
  });

  it('routes every nbd-flavoured scheme to the parser, and nothing else', () => {
    for (const text of ['nbd://h/', 'nbds://h/', 'nbd+unix:///?socket=/s', 'NBD+VSOCK://1/']) assert.ok(looksLikeNbdUri(text), text);
    for (const text of ['/dev/nbd0', 'file.img', 'nbd:x', 'http://h/', './nbd://x']) assert.ok(!looksLikeNbdUri(text), text);
  });

  it('locations name host and port, or the absolute socket path, and the export', () => {
    assert.equal(nbdLocation(parseNbdUri('nbd://example.com/disk')), 'nbd:example.com:10809/disk');
    assert.equal(nbdLocation(parseNbdUri('nbd://[::1]:7/')), 'nbd:[::1]:7/');
    assert.equal(nbdLocation(parseNbdUri('nbd+unix:///e?socket=/run/x.sock')), 'nbd:/run/x.sock/e');
    assert.equal(nbdLocation(parseNbdUri('nbd+unix:///e?socket=x.sock')), `nbd:${process.cwd()}/x.sock/e`);
  });
});
