// An experiment, not a benchmark of pcache: would reading a fragmented 1 MiB request's pieces
// on a worker thread lift the first pass over dirty data (docs/performance.md, "Why the first
// pass over data still dirty stays under the target")?
//
// Each reply is 1 MiB sent over a unix socket to a consumer process that discards it, QD8, from
// a 256 MiB file of random bytes on tmpfs. Three ways to fill a reply:
//   single  one 1 MiB pread at a random MiB: what nbdkit's file plugin does for unfragmented data;
//   loop    256 preads of 4 KiB at random offsets on the event loop: what pcache does today;
//   worker  the same 256 preads on one worker thread into a SharedArrayBuffer, the event loop
//           only sends.
// Rounds alternate the three ways (rotating which goes first); medians are reported, because
// these machines are shared and noisy.
//
//   node scripts/gather_thread_experiment.mjs [--seconds 4] [--rounds 3]

import { Buffer } from 'node:buffer';
import { randomFillSync } from 'node:crypto';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { Worker } from 'node:worker_threads';

const MiB = 1024 * 1024;
const fileBytes = 256 * MiB;
const pieceBytes = 4096;
const piecesPerReply = MiB / pieceBytes;
const queueDepth = 8;

function option(name, fallback) {
  const at = process.argv.indexOf(`--${name}`);
  if (at < 0) return fallback;
  const value = Number(process.argv[at + 1]);
  if (!Number.isInteger(value) || value <= 0) throw new Error(`--${name} wants a positive integer, got ${process.argv[at + 1]}`);
  return value;
}
const seconds = option('seconds', 4);
const rounds = option('rounds', 3);

const dir = fs.mkdtempSync(path.join(fs.existsSync('/dev/shm') ? '/dev/shm' : os.tmpdir(), 'pcache-gather-'));
const file = path.join(dir, 'data.img');
const socketPath = path.join(dir, 'consumer.sock');

// xorshift32: offsets need no quality beyond spreading over the file, and the same sequence
// in every run keeps the ways comparable.
let prngState = 0x2545f491;
function nextPiece() {
  prngState ^= prngState << 13;
  prngState ^= prngState >>> 17;
  prngState ^= prngState << 5;
  prngState >>>= 0;
  return prngState % (fileBytes / pieceBytes);
}

function writeDataFile() {
  const fd = fs.openSync(file, 'w');
  const chunk = Buffer.alloc(MiB);
  for (let written = 0; written < fileBytes; written += MiB) fs.writeSync(fd, randomFillSync(chunk));
  fs.closeSync(fd);
}

const workerSource = `
const { parentPort } = require('node:worker_threads');
const fs = require('node:fs');
parentPort.on('message', ({ id, fd, shared, offsets }) => {
  const target = new Uint8Array(shared);
  for (let i = 0; i < offsets.length; i++) fs.readSync(fd, target, i * ${pieceBytes}, ${pieceBytes}, offsets[i]);
  parentPort.postMessage(id);
});`;

async function runWay(way, fd, socket, worker) {
  const waiting = new Map();
  let nextId = 0;
  const onMessage = (id) => {
    const resolve = waiting.get(id);
    waiting.delete(id);
    resolve();
  };
  worker.on('message', onMessage);
  let replies = 0;
  const deadline = Date.now() + seconds * 1000;
  const cpuBefore = process.cpuUsage();
  const started = process.hrtime.bigint();
  async function lane() {
    const buffer = way === 'worker' ? new Uint8Array(new SharedArrayBuffer(MiB)) : new Uint8Array(MiB);
    const offsets = new Float64Array(piecesPerReply);
    while (Date.now() < deadline) {
      if (way === 'single') {
        fs.readSync(fd, buffer, 0, MiB, (nextPiece() % (fileBytes / MiB)) * MiB);
      } else {
        for (let i = 0; i < piecesPerReply; i++) offsets[i] = nextPiece() * pieceBytes;
        if (way === 'loop') {
          for (let i = 0; i < piecesPerReply; i++) fs.readSync(fd, buffer, i * pieceBytes, pieceBytes, offsets[i]);
        } else {
          await new Promise((resolve) => {
            const id = nextId++;
            waiting.set(id, resolve);
            worker.postMessage({ id, fd, shared: buffer.buffer, offsets });
          });
        }
      }
      await new Promise((resolve, reject) => socket.write(buffer, (error) => (error ? reject(error) : resolve())));
      replies++;
    }
  }
  await Promise.all(Array.from({ length: queueDepth }, lane));
  const elapsedSeconds = Number(process.hrtime.bigint() - started) / 1e9;
  const cpu = process.cpuUsage(cpuBefore);
  worker.off('message', onMessage);
  return { repliesPerSecond: replies / elapsedSeconds, cpuMicrosPerReply: (cpu.user + cpu.system) / replies };
}

function median(values) {
  const sorted = [...values].sort((a, b) => a - b);
  const middle = sorted.length >> 1;
  return sorted.length % 2 === 1 ? sorted[middle] : (sorted[middle - 1] + sorted[middle]) / 2;
}

async function main() {
  writeDataFile();
  const fd = fs.openSync(file, 'r');
  const server = net.createServer();
  await new Promise((resolve) => server.listen(socketPath, resolve));
  const consumer = spawn(process.execPath, ['-e', "require('node:net').connect(process.argv[1]).on('data', () => {})", socketPath], { stdio: 'inherit' });
  const socket = await new Promise((resolve) => server.once('connection', resolve));
  const worker = new Worker(workerSource, { eval: true });
  const ways = ['single', 'loop', 'worker'];
  const results = new Map(ways.map((way) => [way, []]));
  try {
    for (let round = 0; round < rounds; round++) {
      const order = ways.map((_, i) => ways[(i + round) % ways.length]);
      const line = [];
      for (const way of order) {
        const result = await runWay(way, fd, socket, worker);
        results.get(way).push(result);
        line.push(`${way} ${Math.round(result.repliesPerSecond)}/s (${Math.round(result.cpuMicrosPerReply)} µs CPU)`);
      }
      console.log(`round ${round + 1}: ${line.join(', ')}`);
    }
  } finally {
    await worker.terminate();
    socket.destroy();
    consumer.kill();
    server.close();
    fs.closeSync(fd);
    fs.rmSync(dir, { recursive: true, force: true });
  }
  const medianOf = (way) => median(results.get(way).map((r) => r.repliesPerSecond));
  for (const way of ways) {
    console.log(`${way.padEnd(6)} median ${Math.round(medianOf(way))} replies/s, ${Math.round(median(results.get(way).map((r) => r.cpuMicrosPerReply)))} µs of this process's CPU per reply`);
  }
  console.log(`worker/loop ${(medianOf('worker') / medianOf('loop')).toFixed(2)}x, worker/single ${(medianOf('worker') / medianOf('single')).toFixed(2)}x, loop/single ${(medianOf('loop') / medianOf('single')).toFixed(2)}x`);
}

await main();
