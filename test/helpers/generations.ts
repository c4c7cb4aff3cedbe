// A client that writes generations separated by flushes, through pcache's own NBD client, and
// keeps the request history the crash simulator's oracle (sim/oracle.ts) judges states by.
//
// Each generation rewrites every block of a region (blockBytes each, in a shuffled order,
// several in flight) with self-describing payloads, then flushes. The history's clock is a
// phase counter the test moves (nextPhase) at instants it wants to cut the history at: a cut
// at phase k counts what was issued and answered before the k-th move (a checkpoint's start,
// say). The writer stops at stop(), or at the first failed request (the server killed).

import { PcacheError } from '../../src/lib/errors.js';
import { NbdClient } from '../../src/nbd/client/client.js';
import { describeValue, fillPayload, formatViolation, payloadValue, RequestHistory, sectorValues, type OracleView } from '../../sim/oracle.js';
import { Prng } from '../../sim/prng.js';

export interface GenerationOptions {
  readonly regionBytes: number;
  readonly blockBytes: number;
  /** Writes in flight at once. */
  readonly inFlight: number;
  readonly sizeBytes: number;
  readonly seed: number;
}

export class GenerationWriter {
  readonly history: RequestHistory;
  /** Generations whose closing flush succeeded. */
  flushedGenerations = 0;
  /** Latencies of every write and flush, in ms, with the phase it was issued in. */
  readonly latencies: { phase: number; ms: number }[] = [];
  failure: unknown;
  private phase = 0;
  private stopping = false;
  private nextPayloadId = 1;
  private readonly prng: Prng;
  private readonly client: NbdClient;
  private readonly options: GenerationOptions;
  private readonly running: Promise<void>;
  private generationWaiters: { count: number; resolve: () => void }[] = [];

  private constructor(client: NbdClient, options: GenerationOptions) {
    this.client = client;
    this.options = options;
    this.prng = new Prng(options.seed);
    this.history = new RequestHistory({ sizeBytes: options.sizeBytes, clock: () => this.phase });
    this.running = this.run();
  }

  static async start(socketPath: string, options: GenerationOptions): Promise<GenerationWriter> {
    const client = await NbdClient.connect({ kind: 'unix', socketPath }, { exportName: '' });
    return new GenerationWriter(client, options);
  }

  /** Moves the clock on and returns the phase that ended: cut(phase) is the history before now. */
  nextPhase(): number {
    this.phase += 1;
    return this.phase - 1;
  }

  /** Resolves once `count` generations in all have been flushed. */
  untilGenerations(count: number): Promise<void> {
    if (this.flushedGenerations >= count || this.failure !== undefined) return Promise.resolve();
    return new Promise((resolve) => { this.generationWaiters.push({ count, resolve }); });
  }

  /** Stops after the request in flight; resolves once the writer has stopped (and disconnected, when it can). */
  async stop(): Promise<void> {
    this.stopping = true;
    await this.running;
    if (this.failure === undefined) await this.client.disconnect();
    else this.client.destroy(new PcacheError('ESHUTDOWN', 'the writer stopped after a failure'));
  }

  private async run(): Promise<void> {
    const { regionBytes, blockBytes, inFlight } = this.options;
    const blocks = regionBytes / blockBytes;
    try {
      while (!this.stopping) {
        const order = this.prng.shuffle(Array.from({ length: blocks }, (_, index) => index));
        let next = 0;
        const lane = async (): Promise<void> => {
          while (next < order.length) {
            const block = order[next++] ?? 0;
            await this.write(block * blockBytes, blockBytes);
          }
        };
        await Promise.all(Array.from({ length: inFlight }, lane));
        await this.flush();
        this.flushedGenerations++;
        this.generationWaiters = this.generationWaiters.filter((waiter) => {
          if (this.flushedGenerations < waiter.count) return true;
          waiter.resolve();
          return false;
        });
      }
    } catch (error) {
      this.failure = error;
    } finally {
      for (const waiter of this.generationWaiters) waiter.resolve();
      this.generationWaiters = [];
    }
  }

  private async write(offsetBytes: number, lengthBytes: number): Promise<void> {
    const payloadId = this.nextPayloadId++;
    const data = new Uint8Array(lengthBytes);
    fillPayload(data, offsetBytes, payloadId);
    const request = this.history.issueWrite(offsetBytes, lengthBytes, payloadId, { fua: false });
    const phase = this.phase;
    const startedMs = performance.now();
    try {
      await this.client.write(data, offsetBytes);
    } catch (error) {
      this.history.reply(request, false);
      throw error;
    }
    this.history.reply(request, true);
    this.latencies.push({ phase, ms: performance.now() - startedMs });
  }

  private async flush(): Promise<void> {
    const request = this.history.issueFlush();
    const phase = this.phase;
    const startedMs = performance.now();
    try {
      await this.client.flush();
    } catch (error) {
      this.history.reply(request, false);
      throw error;
    }
    this.history.reply(request, true);
    this.latencies.push({ phase, ms: performance.now() - startedMs });
  }
}

/** Reads `regionBytes` from the start of the export at `socketPath` with a fresh connection. */
export async function readRegion(socketPath: string, regionBytes: number): Promise<Uint8Array> {
  const client = await NbdClient.connect({ kind: 'unix', socketPath }, { exportName: '' });
  try {
    const bytes = new Uint8Array(regionBytes);
    const chunkBytes = 1 << 20;
    for (let offset = 0; offset < regionBytes; offset += chunkBytes) {
      await client.read(bytes.subarray(offset, Math.min(regionBytes, offset + chunkBytes)), offset);
    }
    return bytes;
  } finally {
    await client.disconnect();
  }
}

/** The oracle's violations of `bytes` (read from offset 0) as lines, at most `linesMax`; empty when it is a valid state. */
export function oracleProblems(view: OracleView, bytes: Uint8Array, linesMax = 5): string[] {
  const violations = view.checkSectors(bytes, 0);
  return violations.slice(0, linesMax).map((violation) => `${formatViolation(violation)}\n${view.explainSector(violation.sector, 8).join('\n')}`);
}

/**
 * The problems of `bytes` (read from offset 0) as a crash state at an instant known only to lie
 * between phases `a` and `b` (a checkpoint taken by another process in between): each sector
 * must hold a write that is no older than its floor at `a` (what was flushed before a) and was
 * issued by the end of `b`. For histories of writes only (the GenerationWriter's).
 */
export function boundedProblems(history: RequestHistory, a: number, b: number, bytes: Uint8Array, linesMax = 5): string[] {
  const floorView = history.cut(a);
  const values = sectorValues(bytes, 0);
  const problems: string[] = [];
  for (let sector = 0; sector < values.length && problems.length < linesMax; sector++) {
    const found = values[sector] ?? 0;
    const touching = history.requestsAt(sector);
    const valueOf = (request: (typeof touching)[number]): number => payloadValue(request.payloadId, sector - request.offsetBytes / 512);
    const floor = new Set(floorView.floor(sector));
    const floorRequests = touching.filter((request) => floor.has(valueOf(request)));
    const newestFloorIssue = Math.max(-1, ...floorRequests.map((request) => request.issueTime));
    const allowed = new Set<number>(floorRequests.length === 0 ? [0] : []);
    for (const request of touching) {
      if (request.issueClock > b) continue;
      if (request.replyTime !== undefined && request.replyTime < newestFloorIssue) continue;
      allowed.add(valueOf(request));
    }
    if (!allowed.has(found)) {
      problems.push(`sector ${sector}: found ${describeValue(found)}, expected one of {${[...allowed].map(describeValue).join(', ')}}\n${floorView.explainSector(sector, 8).join('\n')}`);
    }
  }
  return problems;
}
