// BufferPool and its use by the server: READ reply buffers are reused only after the
// socket wrote them out, never after a failed Export call, come back with exactly the length
// asked for, stay within the pool's bounds, and reuse never mixes up the data of concurrent
// reads.

import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { PcacheError } from '../../../src/lib/errors.js';
import { BufferPool, bufferPoolBytesMax, bufferPoolPerSizeMax, sharedBufferBytesMin } from '../../../src/nbd/server/buffer_pool.js';
import { MiB } from '../../../src/lib/units.js';
import { patternBytes } from '../../helpers/bytes.js';
import { connectAndGo } from '../../helpers/nbd_raw_client.js';
import { ControlledExport, startServer } from '../../helpers/nbd_server.js';
import { CMD } from '../../helpers/nbd_wire.js';
import { sleep, waitUntil } from '../../helpers/wait.js';


describe('BufferPool', () => {
  it('hands back a given buffer for the same length only, with exactly that length', () => {
    const pool = new BufferPool();
    const first = pool.take(4124);
    assert.equal(first.byteLength, 4124);
    pool.give(first);
    assert.equal(pool.freeBytesHeld, 4124);
    const other = pool.take(4112);
    assert.notEqual(other.buffer, first.buffer, 'another length gets another buffer');
    assert.equal(pool.take(4124), first, 'the same length reuses it');
    assert.equal(pool.freeBytesHeld, 0);
    assert.notEqual(pool.take(4124), first, 'a buffer is handed out once');
  });

  it('hands out shared memory from sharedBufferBytesMin up (a thread may fill it), ordinary memory below', () => {
    const pool = new BufferPool();
    assert.ok(!(pool.take(sharedBufferBytesMin - 1).buffer instanceof SharedArrayBuffer));
    assert.ok(!(pool.take(4096 + 16).buffer instanceof SharedArrayBuffer));
    const large = pool.take(sharedBufferBytesMin);
    assert.ok(large.buffer instanceof SharedArrayBuffer);
    assert.ok(large.every((b) => b === 0), 'a new buffer is zeroed');
    pool.give(large);
    assert.equal(pool.take(sharedBufferBytesMin), large, 'and is pooled like any other');
  });

  it('keeps at most its per-length count and its byte budget', () => {
    const pool = new BufferPool();
    const small = Array.from({ length: bufferPoolPerSizeMax + 10 }, () => pool.take(512));
    for (const buffer of small) pool.give(buffer);
    assert.equal(pool.freeBytesHeld, bufferPoolPerSizeMax * 512);
    const big = 32 * MiB + 16;
    const bigOnes = Array.from({ length: 3 }, () => pool.take(big));
    for (const buffer of bigOnes) pool.give(buffer);
    assert.ok(pool.freeBytesHeld <= bufferPoolBytesMax, `${pool.freeBytesHeld} bytes held`);
    assert.equal(pool.freeBytesHeld, bufferPoolPerSizeMax * 512 + big, 'only one 32 MiB buffer fits the budget next to the small ones');
  });

  it('makes room for the lengths in use now by dropping free buffers of other lengths', () => {
    const pool = new BufferPool();
    const big = MiB + 16;
    const reads = Array.from({ length: 64 }, () => pool.take(big));
    for (const buffer of reads) pool.give(buffer);
    assert.equal(pool.freeBytesHeld, 63 * big, 'the budget is full of 1 MiB read buffers');
    const payloads = Array.from({ length: 100 }, () => pool.take(4096));
    for (const buffer of payloads) pool.give(buffer);
    assert.ok(pool.freeBytesHeld <= bufferPoolBytesMax, `${pool.freeBytesHeld} bytes held`);
    const again = pool.take(4096);
    assert.ok(payloads.includes(again), 'a given-back payload buffer is reused, not dropped');
    assert.ok(pool.freeBytesHeld >= 99 * 4096 + 59 * big, `only what the payloads needed was evicted: ${pool.freeBytesHeld}`);
  });

  it('refuses pieces of buffers (only whole buffers from take())', () => {
    const pool = new BufferPool();
    assert.throws(() => { pool.give(pool.take(1024).subarray(16)); }, /only whole buffers/);
  });
});

describe('READ buffers in the server', () => {
  it('reuses a reply buffer once it was written, and not after a failed read', async (t) => {
    const exp = new ControlledExport(8 * MiB);
    exp.device.bytes.set(patternBytes(8 * MiB, 5));
    exp.mode = 'sync';
    const srv = await startServer({ export: exp });
    t.after(() => srv.stop());
    const { client } = await connectAndGo(srv.path);
    const read = async (offset: number): Promise<{ target: Uint8Array; error: number }> => {
      client.send({ type: CMD.read, cookie: BigInt(offset + 1), offset, length: 4096 });
      const reply = await client.simpleReply(4096);
      const target = exp.lastReadTarget;
      assert.ok(target !== undefined);
      if (reply.error === 0) assert.deepEqual(reply.data, Buffer.from(exp.device.bytes.subarray(offset, offset + 4096)));
      return { target, error: reply.error };
    };
    const first = await read(0);
    await waitUntil(() => srv.server.buffers.freeBytesHeld > 0, 'the written reply buffer went back to the pool');
    const second = await read(8192);
    assert.equal(second.target.buffer, first.target.buffer, 'the second read reused the first one\'s buffer');

    exp.fault = (method) => (method === 'read' ? new PcacheError('EIO', 'injected') : undefined);
    const failed = await read(16384);
    assert.notEqual(failed.error, 0);
    exp.fault = undefined;
    await sleep(20);
    const after = await read(16384);
    assert.notEqual(after.target.buffer, failed.target.buffer, 'a buffer whose read failed is never reused');
    client.disconnect();
  });

  it('returns the right bytes for hundreds of pipelined reads sharing pooled buffers', async (t) => {
    const exp = new ControlledExport(8 * MiB);
    exp.device.bytes.set(patternBytes(8 * MiB, 6));
    exp.mode = 'async';
    const srv = await startServer({ export: exp });
    t.after(() => srv.stop());
    const { client } = await connectAndGo(srv.path);
    const count = 300;
    const offsetOf = (i: number): number => ((i * 7919) % 2048) * 4096;
    for (let round = 0; round < 2; round++) {
      for (let i = 0; i < count; i++) client.send({ type: CMD.read, cookie: BigInt(i), offset: offsetOf(i), length: 4096 });
      for (let i = 0; i < count; i++) {
        const reply = await client.simpleReply(4096);
        assert.equal(reply.error, 0);
        const offset = offsetOf(Number(reply.cookie));
        assert.deepEqual(reply.data, Buffer.from(exp.device.bytes.subarray(offset, offset + 4096)), `read ${reply.cookie} at ${offset}`);
      }
    }
    client.disconnect();
  });
});

describe('WRITE payload buffers in the server', () => {
  it('reuses a payload buffer after a successful write, and not after a failed one', async (t) => {
    const exp = new ControlledExport(8 * MiB);
    exp.mode = 'sync';
    const srv = await startServer({ export: exp });
    t.after(() => srv.stop());
    const { client } = await connectAndGo(srv.path);
    const write = async (offset: number, fill: number): Promise<{ source: Uint8Array; error: number }> => {
      client.send({ type: CMD.write, cookie: BigInt(offset + 1), offset }, Buffer.alloc(4096, fill));
      const reply = await client.simpleReply();
      const source = exp.lastWriteSource;
      assert.ok(source !== undefined);
      assert.equal(source.byteOffset, 0, 'the payload is a whole buffer, not a view of a socket read');
      assert.equal(source.buffer.byteLength, 4096);
      return { source, error: reply.error };
    };
    const first = await write(0, 1);
    assert.equal(first.error, 0);
    const second = await write(4096, 2);
    assert.equal(second.source.buffer, first.source.buffer, 'the second write reused the first one\'s payload buffer');
    assert.ok(exp.device.bytes.subarray(0, 4096).every((byte) => byte === 1), 'the first write landed intact');
    assert.ok(exp.device.bytes.subarray(4096, 8192).every((byte) => byte === 2));

    exp.fault = (method) => (method === 'write' ? new PcacheError('EIO', 'injected') : undefined);
    const failed = await write(8192, 3);
    assert.notEqual(failed.error, 0);
    exp.fault = undefined;
    const after = await write(8192, 4);
    assert.equal(after.error, 0);
    assert.notEqual(after.source.buffer, failed.source.buffer, 'a payload whose write failed is never reused');
    assert.ok(exp.device.bytes.subarray(8192, 12288).every((byte) => byte === 4));
    client.disconnect();
  });
});
