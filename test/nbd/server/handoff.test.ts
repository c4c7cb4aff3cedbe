// Connections handed from one NbdServer to another (export_catalog.ts handOff, NbdServer.adopt):
// the first negotiates, the second serves, here in one process (pcache's volume processes do
// the same across processes). Checked: the handOff gets the terms that were negotiated and the
// bytes read past GO; requests pipelined right behind GO are served by the adopting server;
// structured replies and the base:allocation context carry over; the first server forgets the connection;
// an adopt the second server cannot serve (a name it lacks, another size) closes the socket.

import { describe, it, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import path from 'node:path';
import { MiB } from '../../../src/lib/units.js';
import { ExportMap, type HandedOffTerms } from '../../../src/nbd/server/export_catalog.js';
import type { Export } from '../../../src/nbd/server/export.js';
import { NbdServer } from '../../../src/nbd/server/server.js';
import { patternBytes } from '../../helpers/bytes.js';
import { tempDir } from '../../helpers/files.js';
import { connectClient } from '../../helpers/nbd_client.js';
import { RawClient, ServerClosed } from '../../helpers/nbd_raw_client.js';
import { ControlledExport } from '../../helpers/nbd_server.js';
import { CHUNK, clientFlags, CMD, infoData, OPT, option, REP, request } from '../../helpers/nbd_wire.js';
import { uriFor } from '../../helpers/tools.js';
import { waitUntil } from '../../helpers/wait.js';

const exportBytes = 4 * MiB;
const never = (): never => { throw new Error('the negotiating server called its Export'); };

interface Pair {
  readonly front: NbdServer;
  readonly back: NbdServer;
  readonly path: string;
  readonly served: ControlledExport;
  readonly handed: { terms: HandedOffTerms; leftoverBytes: number }[];
}

/** `front` negotiates "far" and hands it to `back` (which never listens); `adopt` may be replaced. */
async function pair(t: TestContext, adopt?: (back: NbdServer, socket: net.Socket, terms: HandedOffTerms, leftover: Uint8Array) => void): Promise<Pair> {
  const served = new ControlledExport(exportBytes);
  served.device.bytes.set(patternBytes(exportBytes, 7));
  served.mode = 'sync';
  const backCatalog = new ExportMap();
  backCatalog.add({ name: 'far', export: served });
  const back = new NbdServer({ catalog: backCatalog });
  t.after(() => back.close());
  const handed: Pair['handed'] = [];
  // The negotiating server reads only the size of an export it hands off.
  const sizeOnly: Export = { sizeBytes: exportBytes, read: never, write: never, flush: never, trim: never, writeZeroes: never, cache: never, blockStatus: never };
  const frontCatalog = new ExportMap();
  frontCatalog.add({
    name: 'far',
    description: 'served elsewhere',
    export: sizeOnly,
    handOff: (socket, terms, leftover) => {
      handed.push({ terms, leftoverBytes: leftover.length });
      if (adopt !== undefined) adopt(back, socket, terms, leftover);
      else back.adopt(socket, terms, leftover);
    },
  });
  const front = new NbdServer({ catalog: frontCatalog });
  const socketPath = path.join(tempDir(t, 'pcache-nbd-handoff-'), 'nbd.sock');
  await front.listen({ path: socketPath });
  t.after(() => front.close());
  return { front, back, path: socketPath, served, handed };
}

describe('handing a negotiated connection to another server', () => {
  it('serves requests pipelined right behind GO on the adopting server', async (t) => {
    const { front, back, path: socketPath, served, handed } = await pair(t);
    const client = await RawClient.connect(socketPath);
    t.after(() => { client.destroy(); });
    await client.greeting();
    const data = patternBytes(8192, 3);
    client.write(Buffer.concat([
      clientFlags(3),
      option(OPT.go, infoData('far')),
      request({ type: CMD.write, cookie: 1n, offset: 4096 }, data),
      request({ type: CMD.read, cookie: 2n, offset: 0, length: 4096 }),
    ]));
    assert.equal((await client.optionReplies()).at(-1)?.type, REP.ack);
    const first = await client.simpleReply();
    assert.equal(first.error, 0);
    assert.equal(first.cookie, 1n, 'the write, first: the export completes synchronously, in order');
    const second = await client.simpleReply(4096);
    assert.equal(second.cookie, 2n);
    assert.deepEqual(second.data, Buffer.from(served.device.bytes.subarray(0, 4096)));
    assert.deepEqual(Buffer.from(served.device.bytes.subarray(4096, 4096 + 8192)), Buffer.from(data), 'the pipelined write landed on the adopted export');
    const [only] = handed;
    assert.ok(only !== undefined && handed.length === 1);
    assert.equal(only.terms.exportName, 'far');
    assert.equal(only.terms.sizeBytes, exportBytes);
    assert.equal(only.leftoverBytes, 2 * 28 + 8192, 'both requests were read past GO and handed over');
    assert.equal(front.stats().connectionsOpen, 0, 'the negotiating server let go of the connection');
    assert.equal(back.connectionCount('far'), 1);
    client.disconnect();
    await waitUntil(() => back.connectionCount('far') === 0, 'the adopted connection ends on DISC');
  });

  it('keeps structured replies and base:allocation across the handoff (pcache\'s own client)', async (t) => {
    const { back, path: socketPath, served, handed } = await pair(t);
    const client = await connectClient(t, uriFor(socketPath, 'far'));
    const data = patternBytes(64 * 1024, 9);
    await client.write(data, MiB);
    await client.flush();
    const back64 = new Uint8Array(64 * 1024);
    await client.read(back64, MiB);
    assert.deepEqual(Buffer.from(back64), Buffer.from(data));
    assert.deepEqual(Buffer.from(served.device.bytes.subarray(MiB, MiB + data.length)), Buffer.from(data));
    assert.equal(handed[0]?.terms.structuredReplies, true);
    assert.equal(back.connectionCount('far'), 1);

    // A raw client that selects base:allocation: BLOCK_STATUS answers with the context negotiated in front.
    const raw = await RawClient.connect(socketPath);
    t.after(() => { raw.destroy(); });
    await raw.go({ name: 'far', structured: true, metaContext: true });
    const contextId = handed[1]?.terms.baseAllocationContextId;
    assert.ok(contextId !== undefined, 'base:allocation was negotiated before the handoff');
    raw.send({ type: CMD.blockStatus, cookie: 9n, offset: 0, length: 4096 });
    const reply = await raw.reply();
    assert.equal(reply.kind, 'chunk');
    assert.equal(reply.type, CHUNK.blockStatus);
    assert.equal(reply.payload.readUInt32BE(0), contextId);
  });

  it('closes a connection the adopting server cannot serve', async (t) => {
    const { back, path: socketPath } = await pair(t, (server, socket, terms, leftover) => {
      server.adopt(socket, { ...terms, sizeBytes: terms.sizeBytes + 512 }, leftover);
    });
    const client = await RawClient.connect(socketPath);
    t.after(() => { client.destroy(); });
    await client.greeting();
    client.write(Buffer.concat([clientFlags(3), option(OPT.go, infoData('far'))]));
    assert.equal((await client.optionReplies()).at(-1)?.type, REP.ack);
    client.send({ type: CMD.read, cookie: 1n, offset: 0, length: 512 });
    await assert.rejects(client.simpleReply(512), ServerClosed);
    assert.equal(back.connectionCount('far'), 0);
    assert.equal(back.adopt(new net.Socket(), { exportName: 'near', sizeBytes: exportBytes, transmissionFlags: 0, structuredReplies: false, baseAllocationContextId: undefined }, new Uint8Array(0)), false, 'an export it does not have');
  });
});
