// A raw NBD client over node:net for the hostile-input and server tests.
//
// It can speak the protocol correctly (greeting, GO, requests, replies) and can equally send
// any bytes at all, so each test decides exactly what goes on the wire. Reads wait with a time
// limit, and "the server closed the connection" is an observable outcome, not an exception
// the tests have to guess at.

import assert from 'node:assert/strict';
import net from 'node:net';
import {
  clientFlags, CMD, exportInfoOf, type ExportInfo, INFO, infoData, metaContextData, nbdMagic, ihaveopt, OPT, option,
  type OptionReplyMessage, optionReplyMagic, REP, request, type RequestFields, simpleMagic, structuredMagic,
} from './nbd_wire.js';

export const waitLimitMs = 10_000;

export class ServerClosed extends Error {
  override readonly name = 'ServerClosed';
}

export interface SimpleReply {
  kind: 'simple';
  error: number;
  cookie: bigint;
  data: Buffer;
}

export interface Chunk {
  kind: 'chunk';
  flags: number;
  type: number;
  cookie: bigint;
  payload: Buffer;
}

export class RawClient {
  readonly socket: net.Socket;
  private readonly chunks: Buffer[] = [];
  private bufferedBytes = 0;
  private peerEnded = false;
  private wake: (() => void) | undefined;
  readonly closed: Promise<void>;

  private constructor(socket: net.Socket) {
    this.socket = socket;
    socket.on('data', (chunk: Buffer) => {
      this.chunks.push(chunk);
      this.bufferedBytes += chunk.length;
      this.wake?.();
    });
    socket.on('error', () => undefined);
    this.closed = new Promise((resolve) => {
      socket.on('close', () => {
        this.peerEnded = true;
        this.wake?.();
        resolve();
      });
      socket.on('end', () => {
        this.peerEnded = true;
        this.wake?.();
      });
    });
  }

  /** Connects to a Unix socket path, or to a TCP port on 127.0.0.1. */
  static connect(target: string | number): Promise<RawClient> {
    return new Promise((resolve, reject) => {
      const socket = typeof target === 'string' ? net.connect(target) : net.connect(target, '127.0.0.1');
      socket.once('connect', () => { resolve(new RawClient(socket)); });
      socket.once('error', reject);
    });
  }

  /** A client on a socket that is already connected (a TLS socket after STARTTLS). */
  static over(socket: net.Socket): RawClient {
    return new RawClient(socket);
  }

  get buffered(): number {
    return this.bufferedBytes;
  }

  write(bytes: Uint8Array): void {
    if (!this.socket.destroyed) this.socket.write(bytes);
  }

  destroy(): void {
    this.socket.destroy();
  }

  /** Waits for exactly `count` bytes; ServerClosed if the server closes first. */
  async readExact(count: number, timeoutMs = waitLimitMs): Promise<Buffer> {
    const deadline = Date.now() + timeoutMs;
    while (this.bufferedBytes < count) {
      if (this.peerEnded) throw new ServerClosed(`server closed after ${this.bufferedBytes} of ${count} bytes`);
      await this.waitForData(deadline, `${count} bytes`);
    }
    return this.take(count);
  }

  /** Waits until the server ends the connection; returns every byte received before that. */
  async readUntilClosed(timeoutMs = waitLimitMs): Promise<Buffer> {
    const deadline = Date.now() + timeoutMs;
    while (!this.peerEnded) await this.waitForData(deadline, 'the server to close');
    return this.take(this.bufferedBytes);
  }

  // --- Protocol helpers ---

  /** Reads the 18-byte greeting and returns the handshake flags. */
  async greeting(): Promise<number> {
    const bytes = await this.readExact(18);
    assert.equal(bytes.readBigUInt64BE(0), nbdMagic);
    assert.equal(bytes.readBigUInt64BE(8), ihaveopt);
    return bytes.readUInt16BE(16);
  }

  async optionReply(): Promise<OptionReplyMessage> {
    const header = await this.readExact(20);
    assert.equal(header.readBigUInt64BE(0), optionReplyMagic, 'option reply magic');
    const length = header.readUInt32BE(16);
    return { option: header.readUInt32BE(8), type: header.readUInt32BE(12), data: await this.readExact(length) };
  }

  /** Reads replies up to and including the final one (ACK or an error). */
  async optionReplies(): Promise<OptionReplyMessage[]> {
    const replies: OptionReplyMessage[] = [];
    for (;;) {
      const reply = await this.optionReply();
      replies.push(reply);
      if (reply.type === REP.ack || reply.type >= 0x8000_0000) return replies;
    }
  }

  /** Sends one option and returns its replies. */
  async ask(code: number, data?: Uint8Array): Promise<OptionReplyMessage[]> {
    this.write(option(code, data));
    return this.optionReplies();
  }

  /**
   * Greeting, client flags (fixed newstyle + no zeroes), optional structured replies and
   * base:allocation, then GO. Returns what the server said about the export.
   */
  async go(options: { name?: string; structured?: boolean; metaContext?: boolean } = {}): Promise<ExportInfo> {
    await this.greeting();
    this.write(clientFlags(3));
    if (options.structured === true) {
      const replies = await this.ask(OPT.structuredReply);
      assert.equal(replies[0]?.type, REP.ack, 'structured replies refused');
    }
    if (options.metaContext === true) {
      const replies = await this.ask(OPT.setMetaContext, metaContextData(options.name ?? '', ['base:allocation']));
      assert.equal(replies.at(-1)?.type, REP.ack, 'SET_META_CONTEXT refused');
    }
    const replies = await this.ask(OPT.go, infoData(options.name ?? '', [INFO.blockSize, INFO.name]));
    assert.equal(replies.at(-1)?.type, REP.ack, `GO refused: ${replies.at(-1)?.data.toString() ?? ''}`);
    return exportInfoOf(replies);
  }

  send(fields: RequestFields, payload?: Uint8Array): void {
    this.write(request(fields, payload));
  }

  /** A simple reply, with `dataBytes` of data when it reports success. */
  async simpleReply(dataBytes = 0): Promise<SimpleReply> {
    const header = await this.readExact(16);
    assert.equal(header.readUInt32BE(0), simpleMagic, 'simple reply magic');
    const error = header.readUInt32BE(4);
    const data = error === 0 && dataBytes > 0 ? await this.readExact(dataBytes) : Buffer.alloc(0);
    return { kind: 'simple', error, cookie: header.readBigUInt64BE(8), data };
  }

  /** One reply of either kind: a simple reply (with `dataBytes` on success) or one chunk. */
  async reply(dataBytes = 0): Promise<SimpleReply | Chunk> {
    const magic = (await this.peek(4)).readUInt32BE(0);
    if (magic === simpleMagic) return this.simpleReply(dataBytes);
    assert.equal(magic, structuredMagic, `unexpected reply magic 0x${magic.toString(16)}`);
    const header = await this.readExact(20);
    const length = header.readUInt32BE(16);
    return {
      kind: 'chunk',
      flags: header.readUInt16BE(4),
      type: header.readUInt16BE(6),
      cookie: header.readBigUInt64BE(8),
      payload: await this.readExact(length),
    };
  }

  /** Round trip of a simple-reply command: sends it and returns the reply's error number. */
  async command(fields: RequestFields, payload?: Uint8Array): Promise<number> {
    this.send(fields, payload);
    const reply = await this.reply();
    return replyError(reply);
  }

  /** Sends a DISC. */
  disconnect(): void {
    this.send({ type: CMD.disc });
  }

  private async peek(count: number): Promise<Buffer> {
    const bytes = await this.readExact(count);
    this.chunks.unshift(bytes);
    this.bufferedBytes += count;
    return bytes;
  }

  /** Removes `count` buffered bytes from the front, joining only the chunks it needs. */
  private take(count: number): Buffer {
    const parts: Buffer[] = [];
    let needed = count;
    while (needed > 0) {
      const first = this.chunks.shift();
      assert.ok(first !== undefined, 'take past the buffered bytes');
      if (first.length > needed) {
        parts.push(first.subarray(0, needed));
        this.chunks.unshift(first.subarray(needed));
        needed = 0;
      } else {
        parts.push(first);
        needed -= first.length;
      }
    }
    this.bufferedBytes -= count;
    return parts.length === 1 ? parts[0] ?? Buffer.alloc(0) : Buffer.concat(parts, count);
  }

  private waitForData(deadline: number, what: string): Promise<void> {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.wake = undefined;
        reject(new Error(`timed out waiting for ${what}`));
      }, Math.max(0, deadline - Date.now()));
      this.wake = () => {
        clearTimeout(timer);
        this.wake = undefined;
        resolve();
      };
    });
  }
}

/** The NBD error number a reply carries (0 for success). */
export function replyError(reply: SimpleReply | Chunk): number {
  if (reply.kind === 'simple') return reply.error;
  return reply.type >= 0x8000 ? reply.payload.readUInt32BE(0) : 0;
}

/** Connects, negotiates with GO, and hands back the client. */
export async function connectAndGo(path: string | number, options: { name?: string; structured?: boolean; metaContext?: boolean } = {}): Promise<{ client: RawClient; info: ExportInfo }> {
  const client = await RawClient.connect(path);
  const info = await client.go(options);
  return { client, info };
}
