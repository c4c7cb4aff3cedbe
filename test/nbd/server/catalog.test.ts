// NbdServer serving several exports from a catalog, through pcache's own NBD client and a raw
// client that puts exact options on the wire: LIST content, each name reaching its own Export
// (and nothing else), ERR_UNKNOWN on INFO and GO with haggling going on, EXPORT_NAME of an
// unknown name closing only that connection, per-export read-only, exports added and removed
// while the server runs, connectionCount(name) and disconnect(name), per-export observers.
// Also ExportMap's checks and the server's refusal of contradictory options.

import { describe, it, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { MiB } from '../../../src/lib/units.js';
import { ExportMap, singleExportCatalog, type ExportEntry } from '../../../src/nbd/server/export_catalog.js';
import { NbdServer } from '../../../src/nbd/server/server.js';
import { patternBytes } from '../../helpers/bytes.js';
import { isCode } from '../../helpers/errors.js';
import { tempDir } from '../../helpers/files.js';
import { connectClient } from '../../helpers/nbd_client.js';
import { connectAndGo, RawClient } from '../../helpers/nbd_raw_client.js';
import { ControlledExport } from '../../helpers/nbd_server.js';
import { CMD, ERR, INFO, infoData, OPT, option, type OptionReplyMessage, REP, TFLAG } from '../../helpers/nbd_wire.js';
import { uriFor } from '../../helpers/tools.js';
import { waitUntil } from '../../helpers/wait.js';

const exportBytes = 4 * MiB;
const names = ['red', 'green', 'blue'] as const;

interface Served {
  readonly server: NbdServer;
  readonly path: string;
  readonly catalog: ExportMap;
  readonly exports: Map<string, ControlledExport>;
}

/** A server on a fresh socket with three exports, each filled with its own pattern; the default is `defaultName`. */
async function serveThree(t: TestContext, defaultName?: string): Promise<Served> {
  const catalog = new ExportMap(defaultName === undefined ? {} : { defaultName });
  const exports = new Map<string, ControlledExport>();
  names.forEach((name, index) => {
    const exp = patterned(index + 1);
    exports.set(name, exp);
    catalog.add({ name, description: `the ${name} volume`, export: exp });
  });
  const server = new NbdServer({ catalog });
  const socketPath = path.join(tempDir(t, 'pcache-nbd-catalog-'), 'nbd.sock');
  await server.listen({ path: socketPath });
  t.after(() => server.close());
  return { server, path: socketPath, catalog, exports };
}

function patterned(seed: number): ControlledExport {
  const exp = new ControlledExport(exportBytes);
  exp.device.bytes.set(patternBytes(exportBytes, seed));
  exp.mode = 'sync';
  return exp;
}

function exportOf(s: Served, name: string): ControlledExport {
  const exp = s.exports.get(name);
  assert.ok(exp !== undefined, name);
  return exp;
}

function listed(replies: OptionReplyMessage[]): { name: string; description: string }[] {
  assert.equal(replies.at(-1)?.type, REP.ack);
  return replies.filter((reply) => reply.type === REP.server).map((reply) => {
    const nameLength = reply.data.readUInt32BE(0);
    return { name: reply.data.subarray(4, 4 + nameLength).toString(), description: reply.data.subarray(4 + nameLength).toString() };
  });
}

async function listOver(socketPath: string): Promise<{ name: string; description: string }[]> {
  const client = await RawClient.connect(socketPath);
  await client.greeting();
  client.write(Buffer.from([0, 0, 0, 3]));
  const entries = listed(await client.ask(OPT.list));
  client.destroy();
  return entries;
}

/** Reads `length` bytes at `offset` over a raw client in transmission (simple replies). */
async function rawRead(client: RawClient, cookie: bigint, offset: number, length: number): Promise<Buffer> {
  client.send({ type: CMD.read, cookie, offset, length });
  const reply = await client.simpleReply(length);
  assert.deepEqual([reply.cookie, reply.error], [cookie, ERR.ok]);
  return reply.data;
}

/** An export that claims `sizeBytes`, which a catalog must refuse when the protocol cannot serve it. */
function sizedExport(sizeBytes: number): ControlledExport {
  const exp = new ControlledExport(MiB);
  Object.defineProperty(exp, 'sizeBytes', { value: sizeBytes });
  return exp;
}

describe('ExportMap', () => {
  const exp = new ControlledExport(MiB);

  it('lists entries in the order added, finds them by name, and the empty name by the default', () => {
    const map = new ExportMap({ defaultName: 'b' });
    map.add({ name: 'b', export: exp });
    map.add({ name: 'a', export: exp, readOnly: true });
    assert.deepEqual(map.list().map((entry) => entry.name), ['b', 'a']);
    assert.equal(map.find('a')?.readOnly, true);
    assert.equal(map.find('')?.name, 'b');
    assert.equal(map.find('c'), undefined);
    map.defaultName = undefined;
    assert.equal(map.find(''), undefined, 'no default: the empty name selects nothing');
    map.defaultName = 'gone';
    assert.equal(map.find(''), undefined, 'a default naming no entry selects nothing');
    assert.equal(map.remove('b')?.name, 'b');
    assert.equal(map.remove('b'), undefined);
    assert.equal(map.find('b'), undefined);
    assert.equal(map.size, 1);
  });

  it('refuses names and descriptions the protocol cannot carry, sizes it cannot serve, and duplicates, changing nothing', () => {
    const map = new ExportMap();
    map.add({ name: 'taken', export: exp });
    const refused: [ExportEntry, RegExp][] = [
      [{ name: '', export: exp }, /must not be empty/],
      [{ name: 'x'.repeat(4097), export: exp }, /longer than 4096 bytes/],
      [{ name: 'é'.repeat(2049), export: exp }, /longer than 4096 bytes/],
      [{ name: 'nul\0name', export: exp }, /NUL/],
      [{ name: 'half \ud800 surrogate', export: exp }, /not well-formed/],
      [{ name: 'ok', description: 'd'.repeat(4097), export: exp }, /description of export "ok" longer/],
      [{ name: 'odd', export: sizedExport(1000) }, /not a multiple of 512/],
      [{ name: 'negative', export: sizedExport(-512) }, /not a multiple of 512/],
      [{ name: 'taken', export: exp }, /already exists/],
    ];
    for (const [entry, message] of refused) {
      assert.throws(() => { map.add(entry); }, isCode('EINVAL', message), entry.name.slice(0, 20));
    }
    assert.deepEqual(map.list().map((entry) => entry.name), ['taken']);
    map.add({ name: 'x'.repeat(4096), export: exp });
    map.add({ name: '\ufeffleading BOM', export: exp });
    assert.equal(map.size, 3);
  });

  it('singleExportCatalog answers to its name and to the empty name, which may be its name', () => {
    const named = singleExportCatalog({ name: 'disk', export: exp });
    assert.equal(named.find('disk')?.name, 'disk');
    assert.equal(named.find('')?.name, 'disk');
    assert.equal(named.find('other'), undefined);
    assert.equal(singleExportCatalog({ name: '', export: exp }).find('')?.name, '');
  });

  it('a server takes a catalog or one export, not both and not neither', () => {
    const catalog = new ExportMap();
    assert.throws(() => new NbdServer({ catalog, export: exp, exportName: 'x' }), isCode('EINVAL', /not both/));
    assert.throws(() => new NbdServer({ catalog, readOnly: true }), isCode('EINVAL', /not both/));
    assert.throws(() => new NbdServer({ exportName: 'x' }), isCode('EINVAL', /needs a catalog/));
  });
});

describe('a server with several exports', () => {
  it('LIST shows every export with its description', async (t) => {
    const s = await serveThree(t);
    assert.deepEqual(await listOver(s.path), names.map((name) => ({ name, description: `the ${name} volume` })));
  });

  it('each name reaches its own export: reads see its bytes, writes land only there', async (t) => {
    const s = await serveThree(t);
    const before = new Map(names.map((name) => [name, Buffer.from(exportOf(s, name).device.bytes)]));
    for (const [index, name] of names.entries()) {
      const client = await connectClient(t, uriFor(s.path, name));
      assert.equal(client.sizeBytes, exportBytes);
      const head = Buffer.alloc(8192);
      await client.read(head, 0);
      assert.deepEqual(head, before.get(name)?.subarray(0, 8192), `${name} reads its own bytes`);
      await client.write(Buffer.alloc(4096, 0x10 + index), MiB);
      await client.flush();
    }
    for (const [index, name] of names.entries()) {
      const expected = Buffer.from(before.get(name) ?? Buffer.alloc(0));
      expected.fill(0x10 + index, MiB, MiB + 4096);
      assert.ok(Buffer.from(exportOf(s, name).device.bytes).equals(expected), `${name} holds its own write and nobody else's`);
    }
  });

  it('pcache\'s client gets EINVAL for an unknown name, and the server keeps serving', async (t) => {
    const s = await serveThree(t);
    await assert.rejects(() => connectClient(t, uriFor(s.path, 'purple')), isCode('EINVAL', /no export named "purple"/));
    await assert.rejects(() => connectClient(t, uriFor(s.path)), isCode('EINVAL'), 'no default export');
    const client = await connectClient(t, uriFor(s.path, 'blue'));
    const bytes = Buffer.alloc(512);
    await client.read(bytes, 0);
    assert.deepEqual(bytes, Buffer.from(exportOf(s, 'blue').device.bytes.subarray(0, 512)));
  });

  it('INFO and GO of an unknown name get ERR_UNKNOWN with a message; the same connection then goes to a real export', async (t) => {
    const s = await serveThree(t);
    const client = await RawClient.connect(s.path);
    await client.greeting();
    client.write(Buffer.from([0, 0, 0, 3]));
    for (const code of [OPT.info, OPT.go]) {
      const replies = await client.ask(code, infoData('purple', [INFO.name]));
      assert.deepEqual(replies.map((reply) => reply.type), [REP.errUnknown], 'no INFO before the error');
      assert.equal(replies[0]?.data.toString(), 'no export named "purple"');
    }
    const replies = await client.ask(OPT.go, infoData('green', [INFO.name]));
    assert.equal(replies.at(-1)?.type, REP.ack);
    assert.deepEqual(await rawRead(client, 1n, 4096, 4096), Buffer.from(exportOf(s, 'green').device.bytes.subarray(4096, 8192)));
    client.disconnect();
    await client.readUntilClosed();
  });

  it('EXPORT_NAME of an unknown name closes that connection only, and is not counted as a violation', async (t) => {
    const s = await serveThree(t);
    const bystander = await connectAndGo(s.path, { name: 'red' });
    const client = await RawClient.connect(s.path);
    await client.greeting();
    client.write(Buffer.concat([Buffer.from([0, 0, 0, 3]), option(OPT.exportName, Buffer.from('purple'))]));
    assert.equal((await client.readUntilClosed()).length, 0, 'nothing is sent: EXPORT_NAME has no error reply');
    assert.equal(s.server.stats().protocolViolationsTotal, 0);
    assert.deepEqual(await rawRead(bystander.client, 7n, 0, 512), Buffer.from(exportOf(s, 'red').device.bytes.subarray(0, 512)));
    const chosen = await RawClient.connect(s.path);
    await chosen.greeting();
    chosen.write(Buffer.concat([Buffer.from([0, 0, 0, 3]), option(OPT.exportName, Buffer.from('blue'))]));
    const reply = await chosen.readExact(10);
    assert.equal(reply.readBigUInt64BE(0), BigInt(exportBytes));
    assert.deepEqual(await rawRead(chosen, 8n, 512, 512), Buffer.from(exportOf(s, 'blue').device.bytes.subarray(512, 1024)));
    chosen.destroy();
    bystander.client.destroy();
  });

  it('the empty name picks the default export, and read-only is per export', async (t) => {
    const s = await serveThree(t, 'green');
    const readOnly = patterned(9);
    s.catalog.add({ name: 'archive', export: readOnly, readOnly: true });
    const byDefault = await connectAndGo(s.path);
    assert.equal(byDefault.info.name, 'green');
    assert.equal(byDefault.info.flags & TFLAG.readOnly, 0);
    assert.deepEqual(await rawRead(byDefault.client, 1n, 0, 512), Buffer.from(exportOf(s, 'green').device.bytes.subarray(0, 512)));
    assert.equal(s.server.connectionCount('green'), 1, 'counted under its catalog name');
    assert.equal(s.server.connectionCount(''), 0);
    const archive = await connectAndGo(s.path, { name: 'archive' });
    assert.ok((archive.info.flags & TFLAG.readOnly) !== 0);
    assert.equal(await archive.client.command({ type: CMD.write, cookie: 2n, offset: 0, length: 512 }, Buffer.alloc(512, 1)), ERR.eperm);
    assert.equal(await byDefault.client.command({ type: CMD.write, cookie: 3n, offset: 0, length: 512 }, Buffer.alloc(512, 1)), ERR.ok);
    byDefault.client.destroy();
    archive.client.destroy();
  });

  it('exports added and removed while the server runs: LIST and GO follow; connected clients stay until disconnect(name)', async (t) => {
    const s = await serveThree(t);
    const onRed = await connectAndGo(s.path, { name: 'red' });
    const onRedToo = await connectAndGo(s.path, { name: 'red' });
    const onBlue = await connectAndGo(s.path, { name: 'blue' });
    assert.deepEqual(names.map((name) => s.server.connectionCount(name)), [2, 0, 1]);

    const violet = patterned(7);
    s.catalog.add({ name: 'violet', description: 'added later', export: violet });
    assert.deepEqual((await listOver(s.path)).map((entry) => entry.name), ['red', 'green', 'blue', 'violet']);
    const onViolet = await connectAndGo(s.path, { name: 'violet' });
    assert.deepEqual(await rawRead(onViolet.client, 1n, 0, 512), Buffer.from(violet.device.bytes.subarray(0, 512)));

    assert.ok(s.catalog.remove('red') !== undefined);
    assert.deepEqual((await listOver(s.path)).map((entry) => entry.name), ['green', 'blue', 'violet']);
    const late = await RawClient.connect(s.path);
    await late.greeting();
    late.write(Buffer.from([0, 0, 0, 3]));
    assert.deepEqual((await late.ask(OPT.go, infoData('red'))).map((reply) => reply.type), [REP.errUnknown]);
    // A removed export's clients are served until they are disconnected.
    assert.deepEqual(await rawRead(onRed.client, 2n, 0, 512), Buffer.from(exportOf(s, 'red').device.bytes.subarray(0, 512)));
    assert.equal(s.server.connectionCount('red'), 2);

    assert.equal(await s.server.disconnect('red'), 2);
    await onRed.client.readUntilClosed();
    await onRedToo.client.readUntilClosed();
    assert.equal(s.server.connectionCount('red'), 0);
    assert.equal(s.server.connectionCount('blue'), 1);
    assert.deepEqual(await rawRead(onBlue.client, 3n, 0, 512), Buffer.from(exportOf(s, 'blue').device.bytes.subarray(0, 512)), 'other exports are untouched');
    assert.equal(await s.server.disconnect('red'), 0, 'nothing left to disconnect');
    late.destroy();
    onBlue.client.destroy();
    onViolet.client.destroy();
  });

  it('disconnect(name) lets in-flight requests finish and reply, refuses new ones with ESHUTDOWN, and leaves negotiating clients alone', async (t) => {
    const s = await serveThree(t);
    const red = exportOf(s, 'red');
    const green = exportOf(s, 'green');
    red.mode = 'async';
    const onRed = await connectAndGo(s.path, { name: 'red' });
    const onGreen = await connectAndGo(s.path, { name: 'green' });
    const negotiating = await RawClient.connect(s.path);
    await negotiating.greeting();
    negotiating.write(Buffer.from([0, 0, 0, 3]));
    await waitUntil(() => s.server.stats().connectionsOpen === 3, 'three connections are open');

    red.hold();
    onRed.client.send({ type: CMD.read, cookie: 1n, offset: 8192, length: 4096 });
    await waitUntil(() => red.parkedCount === 1, 'the READ is in flight');
    let disconnected = false;
    const disconnecting = s.server.disconnect('red').then((count) => {
      disconnected = true;
      return count;
    });
    onRed.client.send({ type: CMD.read, cookie: 2n, offset: 0, length: 512 });
    const refused = await onRed.client.simpleReply();
    assert.deepEqual([refused.cookie, refused.error], [2n, ERR.eshutdown]);
    assert.equal(disconnected, false, 'disconnect waits for the request in flight');
    red.release();
    const drained = await onRed.client.simpleReply(4096);
    assert.deepEqual([drained.cookie, drained.error], [1n, ERR.ok]);
    assert.deepEqual(drained.data, Buffer.from(red.device.bytes.subarray(8192, 12288)));
    await onRed.client.readUntilClosed();
    assert.equal(await disconnecting, 1);

    // The client that was negotiating can still choose an export, and the green client is served.
    const replies = await negotiating.ask(OPT.go, infoData('red'));
    assert.equal(replies.at(-1)?.type, REP.ack, 'red is still in the catalog: disconnect does not remove it');
    assert.deepEqual(await rawRead(negotiating, 3n, 0, 512), Buffer.from(red.device.bytes.subarray(0, 512)));
    assert.deepEqual(await rawRead(onGreen.client, 4n, 0, 512), Buffer.from(green.device.bytes.subarray(0, 512)));
    negotiating.destroy();
    onGreen.client.destroy();
  });

  it('an export with its own observer reports its requests there; the others report to the server\'s', async (t) => {
    const catalog = new ExportMap();
    const seen = { server: [] as number[], own: [] as number[] };
    catalog.add({ name: 'plain', export: patterned(1) });
    catalog.add({ name: 'watched', export: patterned(2), observer: { requestAnswered: (command) => { seen.own.push(command); } } });
    const server = new NbdServer({ catalog, observer: { requestAnswered: (command) => { seen.server.push(command); } } });
    const socketPath = path.join(tempDir(t, 'pcache-nbd-catalog-'), 'nbd.sock');
    await server.listen({ path: socketPath });
    t.after(() => server.close());
    const plain = await connectAndGo(socketPath, { name: 'plain' });
    const watched = await connectAndGo(socketPath, { name: 'watched' });
    await rawRead(plain.client, 1n, 0, 512);
    assert.equal(await watched.client.command({ type: CMD.write, cookie: 2n, offset: 0, length: 512 }, Buffer.alloc(512)), ERR.ok);
    await rawRead(watched.client, 3n, 0, 512);
    assert.deepEqual(seen, { server: [CMD.read], own: [CMD.write, CMD.read] });
    plain.client.destroy();
    watched.client.destroy();
  });

  it('close() still ends every connection of every export', async (t) => {
    const s = await serveThree(t);
    const clients = await Promise.all(names.map((name) => connectAndGo(s.path, { name })));
    await s.server.close();
    for (const { client } of clients) await client.readUntilClosed();
    assert.equal(s.server.stats().connectionsOpen, 0);
    await assert.rejects(() => RawClient.connect(s.path));
  });

  it('an export removed and then added again under the same name serves the new Export', async (t) => {
    const s = await serveThree(t);
    s.catalog.remove('green');
    const replacement = patterned(42);
    s.catalog.add({ name: 'green', export: replacement });
    const { client } = await connectAndGo(s.path, { name: 'green' });
    assert.deepEqual(await rawRead(client, 1n, 0, 512), Buffer.from(replacement.device.bytes.subarray(0, 512)));
    client.destroy();
  });
});
