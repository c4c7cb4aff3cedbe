// The TLS forms of NBD URIs (nbds://, nbds+unix://) with libnbd's query parameters: what they
// parse to, that the canonical form parses back to the same value, that TLS does not change a
// backing export's identity, and every refusal with the reason in its message.

import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { PcacheError } from '../../../src/lib/errors.js';
import { formatNbdUri, nbdLocation, parseNbdUri, type NbdUri } from '../../../src/nbd/client/uri.js';

const good: [string, NbdUri][] = [
  ['nbds://example.com/disk', { address: { kind: 'tcp', host: 'example.com', port: 10809 }, exportName: 'disk', tls: { verifyPeer: true } }],
  ['nbds://h:10900/?tls-certificates=/etc/pki/libnbd', { address: { kind: 'tcp', host: 'h', port: 10900 }, exportName: '', tls: { verifyPeer: true, certificatesDir: '/etc/pki/libnbd' } }],
  ['NBDS+UNIX:///e?socket=/run/n.sock&tls-certificates=certs', { address: { kind: 'unix', socketPath: '/run/n.sock' }, exportName: 'e', tls: { verifyPeer: true, certificatesDir: 'certs' } }],
  ['nbds+unix://alice@/?socket=/s&tls-psk-file=/k/keys.psk', { address: { kind: 'unix', socketPath: '/s' }, exportName: '', tls: { verifyPeer: true, pskFile: '/k/keys.psk', username: 'alice' } }],
  ['nbds://al%20ice@[::1]:7/x?tls-psk-file=k%20s', { address: { kind: 'tcp', host: '::1', port: 7 }, exportName: 'x', tls: { verifyPeer: true, pskFile: 'k s', username: 'al ice' } }],
  ['nbds://h/?tls-verify-peer=false', { address: { kind: 'tcp', host: 'h', port: 10809 }, exportName: '', tls: { verifyPeer: false } }],
  ['nbds://h/?tls-verify-peer', { address: { kind: 'tcp', host: 'h', port: 10809 }, exportName: '', tls: { verifyPeer: true } }],
  ['nbds://h/?tls-verify-peer=0&tls-hostname=nbd.example', { address: { kind: 'tcp', host: 'h', port: 10809 }, exportName: '', tls: { verifyPeer: false, hostname: 'nbd.example' } }],
  ['nbds+unix:///?socket=/s&tls-hostname=storage-7&tls-certificates=/c&tls-verify-peer=yes', { address: { kind: 'unix', socketPath: '/s' }, exportName: '', tls: { verifyPeer: true, hostname: 'storage-7', certificatesDir: '/c' } }],
];

const bad: [string, RegExp][] = [
  ['nbd://h/?tls-certificates=/c', /tls-certificates= needs TLS: use nbds:\/\//],
  ['nbd+unix:///?socket=/s&tls-psk-file=/k', /tls-psk-file= needs TLS: use nbds\+unix:\/\//],
  ['nbd://alice@h/', /user name is only meaningful with TLS/],
  ['nbds://h/?tls-certificates=/c&tls-psk-file=/k', /cannot be used together/],
  ['nbds://alice@h/?tls-certificates=/c', /user name is the PSK username: it needs tls-psk-file=/],
  ['nbds://a:b@h/?tls-psk-file=/k', /PSK user name must be non-empty and without ":"/],
  ['nbds://@h/?tls-psk-file=/k', /PSK user name must be non-empty/],
  ['nbds://h/?tls-psk-file=/k&tls-verify-peer=0', /concern the server's certificate/],
  ['nbds://h/?tls-psk-file=/k&tls-hostname=x', /concern the server's certificate/],
  ['nbds://h/?tls-verify-peer=maybe', /tls-verify-peer= takes 1 or 0/],
  ['nbds://h/?tls-certificates=', /tls-certificates= needs a directory/],
  ['nbds://h/?tls-psk-file=', /tls-psk-file= needs a file/],
  ['nbds://h/?tls-hostname=', /tls-hostname= needs a host name/],
  ['nbds://h/?tls-type=psk', /unknown query parameter "tls-type"/],
  ['nbds://h/?socket=/s', /socket= belongs to nbds\+unix:\/\/ URIs/],
  ['nbds+unix:///', /nbds\+unix:\/\/ needs \?socket=PATH/],
  ['nbds+unix://host/?socket=/s', /nbds\+unix:\/\/ takes no host/],
  ['nbds+vsock://2/', /transport nbds\+vsock:\/\/ is not supported/],
  ['nbds://h/?tls-certificates=/a&tls-certificates=/b', /"tls-certificates" is given twice/],
];

describe('NBD URIs with TLS', () => {
  for (const [text, expected] of good) {
    it(`parses ${text}`, () => {
      const parsed = parseNbdUri(text);
      assert.deepEqual(parsed, expected);
      assert.deepEqual(parseNbdUri(formatNbdUri(parsed)), parsed, `round trip through ${formatNbdUri(parsed)}`);
    });
  }

  for (const [text, message] of bad) {
    it(`refuses ${JSON.stringify(text)} with EINVAL`, () => {
      assert.throws(() => parseNbdUri(text), (error: unknown) => {
        assert.ok(error instanceof PcacheError, 'a PcacheError');
        assert.equal(error.code, 'EINVAL');
        assert.match(error.message, message);
        return true;
      });
    });
  }

  it('formats canonical TLS URIs: user first, socket first among the parameters, tls-verify-peer only when off', () => {
    assert.equal(formatNbdUri(parseNbdUri('nbds+unix://alice@/d?tls-psk-file=/k&socket=/s')), 'nbds+unix://alice@/d?socket=/s&tls-psk-file=/k');
    assert.equal(formatNbdUri(parseNbdUri('nbds://h:10809/?tls-verify-peer=1&tls-certificates=/c%20d')), 'nbds://h/?tls-certificates=/c%20d');
    assert.equal(formatNbdUri(parseNbdUri('nbds://h/?tls-verify-peer=off')), 'nbds://h/?tls-verify-peer=false');
  });

  it('TLS does not change where an export is: the identity of nbd:// and nbds:// to one export is the same', () => {
    assert.equal(nbdLocation(parseNbdUri('nbds://example.com/disk?tls-certificates=/c')), nbdLocation(parseNbdUri('nbd://example.com/disk')));
    assert.equal(nbdLocation(parseNbdUri('nbds+unix://alice@/e?socket=/run/x.sock&tls-psk-file=/k')), 'nbd:/run/x.sock/e');
  });
});
