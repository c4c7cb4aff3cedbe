// The server handshake codec with several exports in its directory: LIST shows each one, INFO,
// GO and EXPORT_NAME pick one by name (the empty name is the default, if any), an unknown name
// is ERR_UNKNOWN and haggling goes on (EXPORT_NAME closes), the meta-context options check the
// export they name and a context selected for one export does not carry over to another, and
// the directory is asked afresh at every option. Transcripts are fed at every split.

import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import type { OfferedExport } from '../../../src/nbd/protocol/handshake_exports.js';
import { Handshake, type HandshakeConfig } from '../../../src/nbd/protocol/handshake_server.js';
import { MiB } from '../../../src/lib/units.js';
import { assertChunkingInvariant } from '../../helpers/bytes.js';
import { exportsOf } from '../../helpers/nbd_exports.js';
import {
  clientFlags, exportInfoOf, INFO, infoData, metaContextData, OPT, option, type OptionReplyMessage, parseOptionReplies, REP, TFLAG,
} from '../../helpers/nbd_wire.js';

const three: OfferedExport[] = [
  { name: 'alpha', description: 'the first', sizeBytes: MiB, readOnly: false },
  { name: 'beta', description: undefined, sizeBytes: 2 * MiB, readOnly: true },
  { name: 'gämma ✓', description: 'non-ASCII name', sizeBytes: 3 * MiB, readOnly: false },
];

function configOf(exports: HandshakeConfig['exports']): HandshakeConfig {
  return { exports, offerNoZeroes: true, offerStructuredReplies: true, optionLengthMaxBytes: 64 * 1024, optionsMax: 32 };
}

interface Run {
  replies: OptionReplyMessage[];
  /** The server's raw output after the greeting, hex (EXPORT_NAME's reply is not framed). */
  raw: string;
  kind: string;
  violation: boolean | undefined;
  exportName: string | undefined;
  sizeBytes: number | undefined;
  contextId: number | undefined;
}

function run(config: HandshakeConfig, transcript: Buffer, framed = true): Run {
  return assertChunkingInvariant(transcript, (chunks) => {
    const handshake = new Handshake(config);
    const out: Uint8Array[] = [];
    for (const chunk of chunks) handshake.push(chunk, out);
    const raw = Buffer.concat(out);
    const verdict = handshake.status;
    return {
      replies: framed ? parseOptionReplies(raw) : [],
      raw: raw.toString('hex'),
      kind: verdict.kind,
      violation: verdict.kind === 'closed' ? verdict.violation : undefined,
      exportName: verdict.kind === 'transmission' ? verdict.negotiated.export.name : undefined,
      sizeBytes: verdict.kind === 'transmission' ? verdict.negotiated.sizeBytes : undefined,
      contextId: verdict.kind === 'transmission' ? verdict.negotiated.baseAllocationContextId : undefined,
    };
  });
}

function serverEntry(reply: OptionReplyMessage): { name: string; description: string } {
  const nameLength = reply.data.readUInt32BE(0);
  return { name: reply.data.subarray(4, 4 + nameLength).toString(), description: reply.data.subarray(4 + nameLength).toString() };
}

describe('handshake codec with several exports', () => {
  it('LIST sends one SERVER reply per export, in directory order, with its description', () => {
    const result = run(configOf(exportsOf(three)), Buffer.concat([clientFlags(3), option(OPT.list)]));
    assert.deepEqual(result.replies.map((reply) => reply.type), [REP.server, REP.server, REP.server, REP.ack]);
    assert.deepEqual(result.replies.slice(0, 3).map(serverEntry), [
      { name: 'alpha', description: 'the first' },
      { name: 'beta', description: '' },
      { name: 'gämma ✓', description: 'non-ASCII name' },
    ]);
  });

  it('LIST of an empty directory is a bare ACK', () => {
    const result = run(configOf(exportsOf([])), Buffer.concat([clientFlags(3), option(OPT.list)]));
    assert.deepEqual(result.replies.map((reply) => reply.type), [REP.ack]);
  });

  it('INFO of an unknown name is ERR_UNKNOWN with a message and no INFO; the client then goes to another export', () => {
    const transcript = Buffer.concat([
      clientFlags(3),
      option(OPT.info, infoData('delta', [INFO.name])),
      option(OPT.go, infoData('delta', [])),
      option(OPT.info, infoData('beta', [INFO.name, INFO.description])),
      option(OPT.go, infoData('gämma ✓', [INFO.name, INFO.description])),
    ]);
    const result = run(configOf(exportsOf(three)), transcript);
    const [infoUnknown, goUnknown, ...rest] = result.replies;
    assert.equal(infoUnknown?.type, REP.errUnknown);
    assert.equal(infoUnknown.option, OPT.info);
    assert.equal(infoUnknown.data.toString(), 'no export named "delta"');
    assert.equal(goUnknown?.type, REP.errUnknown);
    assert.equal(goUnknown.option, OPT.go);
    const info = rest.filter((reply) => reply.option === OPT.info);
    const beta = exportInfoOf(info);
    assert.equal(beta.name, 'beta');
    assert.equal(beta.sizeBytes, BigInt(2 * MiB));
    assert.equal(beta.description, undefined, 'beta has no description to send');
    assert.ok((beta.flags & TFLAG.readOnly) !== 0, 'beta is read-only');
    assert.equal(beta.flags & TFLAG.sendTrim, 0);
    const gamma = exportInfoOf(rest.filter((reply) => reply.option === OPT.go));
    assert.equal(gamma.name, 'gämma ✓');
    assert.equal(gamma.description, 'non-ASCII name');
    assert.equal(gamma.flags & TFLAG.readOnly, 0);
    assert.equal(result.kind, 'transmission');
    assert.equal(result.exportName, 'gämma ✓');
    assert.equal(result.sizeBytes, 3 * MiB);
  });

  it('the empty name is the default export, or ERR_UNKNOWN when the directory has none', () => {
    const go = Buffer.concat([clientFlags(3), option(OPT.go, infoData('', [INFO.name]))]);
    const withDefault = run(configOf(exportsOf(three, 'beta')), go);
    assert.equal(withDefault.exportName, 'beta');
    assert.equal(exportInfoOf(withDefault.replies).name, 'beta', 'INFO_NAME tells the client the default export\'s real name');
    const withoutDefault = run(configOf(exportsOf(three)), go);
    assert.equal(withoutDefault.kind, 'negotiating');
    assert.deepEqual(withoutDefault.replies.map((reply) => reply.type), [REP.errUnknown]);
    assert.match(withoutDefault.replies[0]?.data.toString() ?? '', /no default export/);
  });

  it('a name whose bytes are not UTF-8 is unknown, and a prefix of a name is not that name', () => {
    const transcript = Buffer.concat([
      clientFlags(3),
      option(OPT.info, infoData(Buffer.from([0x61, 0x6c, 0xff]), [])),
      option(OPT.info, infoData('alph', [])),
      option(OPT.info, infoData('alpha\0', [])),
    ]);
    const result = run(configOf(exportsOf(three)), transcript);
    assert.deepEqual(result.replies.map((reply) => reply.type), [REP.errUnknown, REP.errUnknown, REP.errUnknown]);
  });

  it('EXPORT_NAME picks the named export; an unknown name closes without counting as a violation', () => {
    const chosen = run(configOf(exportsOf(three)), Buffer.concat([clientFlags(3), option(OPT.exportName, Buffer.from('beta'))]), false);
    assert.equal(chosen.kind, 'transmission');
    assert.equal(chosen.exportName, 'beta');
    const raw = Buffer.from(chosen.raw, 'hex');
    assert.equal(raw.readBigUInt64BE(0), BigInt(2 * MiB));
    assert.ok((raw.readUInt16BE(8) & TFLAG.readOnly) !== 0);
    const unknown = run(configOf(exportsOf(three)), Buffer.concat([clientFlags(3), option(OPT.exportName, Buffer.from('nope'))]), false);
    assert.equal(unknown.kind, 'closed');
    assert.equal(unknown.violation, false);
    assert.equal(unknown.raw, '', 'EXPORT_NAME has no error reply');
  });

  it('LIST_META_CONTEXT and SET_META_CONTEXT of an unknown export are ERR_UNKNOWN, and SET drops the earlier selection', () => {
    const transcript = Buffer.concat([
      clientFlags(3),
      option(OPT.structuredReply),
      option(OPT.listMetaContext, metaContextData('nope', [])),
      option(OPT.setMetaContext, metaContextData('alpha', ['base:allocation'])),
      option(OPT.setMetaContext, metaContextData('nope', ['base:allocation'])),
      option(OPT.go, infoData('alpha')),
    ]);
    const result = run(configOf(exportsOf(three)), transcript);
    assert.deepEqual(result.replies.map((reply) => [reply.option, reply.type]), [
      [OPT.structuredReply, REP.ack],
      [OPT.listMetaContext, REP.errUnknown],
      [OPT.setMetaContext, REP.metaContext], [OPT.setMetaContext, REP.ack],
      [OPT.setMetaContext, REP.errUnknown],
      [OPT.go, REP.info], [OPT.go, REP.info], [OPT.go, REP.ack],
    ]);
    assert.equal(result.contextId, undefined, 'the failed SET replaced the selection');
  });

  it('a meta context selected for one export is not carried over to GO on another', () => {
    const setFor = (setName: string, goName: string): Run => run(configOf(exportsOf(three, 'alpha')), Buffer.concat([
      clientFlags(3),
      option(OPT.structuredReply),
      option(OPT.setMetaContext, metaContextData(setName, ['base:allocation'])),
      option(OPT.go, infoData(goName)),
    ]));
    assert.equal(setFor('beta', 'alpha').contextId, undefined, 'SET named beta, GO chose alpha');
    assert.equal(setFor('beta', 'alpha').exportName, 'alpha');
    assert.notEqual(setFor('alpha', 'alpha').contextId, undefined);
    assert.notEqual(setFor('', 'alpha').contextId, undefined, 'the empty name and the default export\'s name are the same export');
    assert.notEqual(setFor('alpha', '').contextId, undefined);
  });

  it('asks the directory at every option: an export added or removed between options shows at once', () => {
    const entries: OfferedExport[] = [three[0] as OfferedExport];
    const directory = {
      list: () => entries,
      find: (name: string) => entries.find((entry) => entry.name === name),
    };
    const handshake = new Handshake(configOf(directory));
    const out: Uint8Array[] = [];
    handshake.push(Buffer.concat([clientFlags(3), option(OPT.list), option(OPT.info, infoData('beta'))]), out);
    entries.push(three[1] as OfferedExport);
    handshake.push(Buffer.concat([option(OPT.list), option(OPT.info, infoData('beta'))]), out);
    entries.splice(0, 1);
    handshake.push(Buffer.concat([option(OPT.list), option(OPT.go, infoData('alpha'))]), out);
    const replies = parseOptionReplies(Buffer.concat(out));
    const lists = [[] as string[]];
    for (const reply of replies) {
      if (reply.option === OPT.list && reply.type === REP.server) lists.at(-1)?.push(serverEntry(reply).name);
      if (reply.option === OPT.list && reply.type === REP.ack) lists.push([]);
    }
    assert.deepEqual(lists.slice(0, 3), [['alpha'], ['alpha', 'beta'], ['beta']]);
    const finals = replies.filter((reply) => reply.option !== OPT.list && (reply.type === REP.ack || reply.type >= 0x8000_0000));
    assert.deepEqual(finals.map((reply) => [reply.option, reply.type]), [
      [OPT.info, REP.errUnknown], [OPT.info, REP.ack], [OPT.go, REP.errUnknown],
    ]);
    assert.equal(handshake.status.kind, 'negotiating');
  });
});
