// A scripted NBD server over a temporary Unix socket, for the client tests that need a server
// to misbehave in one exact way: answer GO with ERR_UNSUP, send a malformed reply, overlap
// READ chunks, never reply, never greet.
//
// It parses what the client sends with Buffer's own methods (independent of src/nbd) and
// lets the test decide every byte it answers (helpers/nbd_wire.ts builds the messages). Options and requests are handed to callbacks;
// whatever they return is written back.

import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import type { TestContext } from 'node:test';
import { goReplies, OPT, optionReply, REP, serverGreeting } from '../../helpers/nbd_wire.js';

export const TRANSMISSION = Symbol('transmission');

export interface FakeRequest {
  readonly flags: number;
  readonly type: number;
  readonly cookie: bigint;
  readonly offset: number;
  readonly length: number;
  readonly payload: Buffer | undefined;
}

export interface FakeScript {
  /** Sent on connect; `undefined` sends nothing at all (a server that never greets). */
  readonly greeting?: Buffer | undefined;
  /** Bytes to answer an option with; TRANSMISSION (after writing `reply`) enters transmission. */
  onOption(option: number, data: Buffer): { reply: Buffer; next?: typeof TRANSMISSION };
  /** Bytes to answer a request with (an empty buffer answers nothing). */
  onRequest(request: FakeRequest, socket: net.Socket): Buffer;
}

export interface FakeServer {
  readonly uri: string;
  readonly socketPath: string;
  readonly requests: FakeRequest[];
  readonly sockets: Set<net.Socket>;
  close(): Promise<void>;
}

/** Starts a scripted server; it is closed after the test. */
export async function startFakeServer(t: TestContext, script: FakeScript): Promise<FakeServer> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'pcache-fake-nbd-'));
  const socketPath = path.join(dir, 'fake.sock');
  const requests: FakeRequest[] = [];
  const sockets = new Set<net.Socket>();
  const server = net.createServer((socket) => {
    sockets.add(socket);
    socket.on('error', () => undefined);
    socket.on('close', () => sockets.delete(socket));
    serve(socket, script, requests);
  });
  await new Promise<void>((resolve) => { server.listen(socketPath, resolve); });
  const fake: FakeServer = {
    uri: `nbd+unix:///?socket=${socketPath}`,
    socketPath,
    requests,
    sockets,
    async close() {
      for (const socket of sockets) socket.destroy();
      await new Promise<void>((resolve) => { server.close(() => { resolve(); }); });
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
  t.after(() => fake.close());
  return fake;
}

function serve(socket: net.Socket, script: FakeScript, requests: FakeRequest[]): void {
  const greeting = 'greeting' in script ? script.greeting : serverGreeting();
  if (greeting !== undefined) socket.write(greeting);
  let buffered = Buffer.alloc(0);
  let phase: 'flags' | 'options' | 'transmission' = 'flags';
  socket.on('data', (chunk: Buffer) => {
    buffered = Buffer.concat([buffered, chunk]);
    for (;;) {
      if (phase === 'flags') {
        if (buffered.length < 4) return;
        buffered = buffered.subarray(4);
        phase = 'options';
      } else if (phase === 'options') {
        if (buffered.length < 16) return;
        const length = buffered.readUInt32BE(12);
        if (buffered.length < 16 + length) return;
        const code = buffered.readUInt32BE(8);
        const data = buffered.subarray(16, 16 + length);
        buffered = buffered.subarray(16 + length);
        const answer = script.onOption(code, Buffer.from(data));
        socket.write(answer.reply);
        if (answer.next === TRANSMISSION) phase = 'transmission';
      } else {
        if (buffered.length < 28) return;
        const type = buffered.readUInt16BE(6);
        const length = buffered.readUInt32BE(24);
        const payloadBytes = type === 1 ? length : 0;
        if (buffered.length < 28 + payloadBytes) return;
        const request: FakeRequest = {
          flags: buffered.readUInt16BE(4),
          type,
          cookie: buffered.readBigUInt64BE(8),
          offset: Number(buffered.readBigUInt64BE(16)),
          length,
          payload: payloadBytes > 0 ? Buffer.from(buffered.subarray(28, 28 + payloadBytes)) : undefined,
        };
        buffered = buffered.subarray(28 + payloadBytes);
        requests.push(request);
        const reply = script.onRequest(request, socket);
        if (reply.length > 0) socket.write(reply);
      }
    }
  });
}

/** A well-behaved option phase: STRUCTURED_REPLY as told, GO for an export of the given size. */
export function standardOptions(options: { sizeBytes: number; flags: number; structured: boolean; blockSize?: [number, number, number] }): FakeScript['onOption'] {
  return (code) => {
    if (code === OPT.structuredReply) return { reply: optionReply(code, options.structured ? REP.ack : REP.errUnsup) };
    if (code === OPT.go) return { reply: goReplies(options.sizeBytes, options.flags, options.blockSize), next: TRANSMISSION };
    return { reply: optionReply(code, REP.errUnsup) };
  };
}
