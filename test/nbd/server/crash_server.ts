// A server whose Export fails with a programmer error, run as a child process by
// server.test.ts: the server must let such an error crash the process rather than turn it
// into an NBD error reply. Usage: node crash_server.js <socket path> <sync|async>.

import { AssertionFailure } from '../../../src/lib/assert.js';
import { NbdServer } from '../../../src/nbd/server/server.js';
import { MiB } from '../../../src/lib/units.js';
import { ControlledExport } from '../../helpers/nbd_server.js';

const [socketPath, mode] = process.argv.slice(2);
if (socketPath === undefined || (mode !== 'sync' && mode !== 'async')) throw new Error('usage: crash_server.js <socket path> <sync|async>');

const exp = new ControlledExport(MiB);
exp.mode = mode;
exp.fault = (method) => (method === 'read' ? new AssertionFailure(`injected broken invariant (${mode})`) : undefined);
const server = new NbdServer({ export: exp, exportName: 'crash', readOnly: false });
await server.listen({ path: socketPath });
console.log('ready');
