// Crash harness: drives a system under test on two simulated devices, crashes it at every
// device-operation boundary (or at random instants), restarts it on every crash state, and
// checks what it reads back against the oracle (docs/testing.md, "The crash simulator").
//
// The system is anything that implements CrashTarget; the harness knows nothing about caches.
// Two drivers:
// - runExhaustive: every workload of 1..opsMax operations over a few blocks and payload
//   values; for every boundary of the combined event log of both devices, the prefix, omit-one
//   and torn-last states of each device, paired;
// - runRandomized: long seeded workloads with several requests in flight on devices that
//   complete I/O in a seeded random order; random crash instants, up to N states each; the
//   run continues from one crash state (recovered, drained, closed), so later segments run on
//   devices with history.
// For every distinct crash state the harness opens (recovers) the target, reads the checked
// range and runs its structural check; crashes again at every prefix of recovery's own writes
// and recovers once more, requiring the same bytes; optionally drains the cache and requires
// the backing device to hold a prefix of the flush epochs, and requires the same of the raw
// backing device (the cache lost). Results are cached per state key, so a state reached from
// many crash points is opened once and checked against each crash point's oracle.
//
// Every random choice comes from a printed seed; every violation prints a one-line command
// that replays it. Invariants: the harness never awaits a powered-off device; it bounds the
// requests it keeps in flight, the violations it keeps, and the events of one workload.

import { AssertionFailure, assert } from '../src/lib/assert.js';
import { isPcacheError, PcacheError } from '../src/lib/errors.js';
import { sectorSizeBytes } from '../src/lib/units.js';
import type { BlockDevice } from '../src/device/block_device.js';
import {
  combineStates,
  CrashStateSet,
  materialize,
  prefixState,
  randomStates,
  standardStates,
  type CrashState,
  type GarbagePredicate,
  type SystemCrashState,
  type TearOptions,
} from './crash_states.js';
import type { CrashPoint, VolatileWrite } from './device_model.js';
import {
  compareReads,
  fillPayload,
  formatViolation,
  RequestHistory,
  sectorValues,
  type HistoryRequest,
  type OracleView,
  type SectorValuesDelta,
  type SectorViolation,
} from './oracle.js';
import type { PageImage, ReadonlyPageImage } from './page_image.js';
import { Prng } from './prng.js';
import { DeltaDecoder, ImageDecoder } from './sector_delta.js';
import { DeviceEventLog, IoScheduler, SimDevice, type CompletionOrder } from './sim_device.js';
import {
  defaultOpWeights,
  enumerateOps,
  enumerateWorkloads,
  exhaustiveOpKinds,
  parseWorkload,
  randomOp,
  workloadText,
  type OpKind,
  type OpWeights,
  type WorkloadOp,
} from './workload.js';

type MaybePromise<T> = T | Promise<T>;

/** How to start the system under test on two devices, recovering whatever they hold. */
export interface CrashTarget {
  open(cache: BlockDevice, backing: BlockDevice): Promise<OpenTarget>;
}

export interface OpenTarget {
  read(target: Uint8Array, offsetBytes: number): MaybePromise<void>;
  write(source: Uint8Array, offsetBytes: number, options: { fua: boolean }): MaybePromise<void>;
  flush(): MaybePromise<void>;
  trim(offsetBytes: number, lengthBytes: number, options: { fua: boolean }): MaybePromise<void>;
  writeZeroes(offsetBytes: number, lengthBytes: number, options: { fua: boolean; fastZero: boolean }): MaybePromise<void>;
  /** One round of background writeback, if any is due. */
  writebackStep(): Promise<void>;
  /** One round of garbage collection, if any is due. */
  gcStep(): Promise<void>;
  /** Writes everything back to the backing device. */
  drain(): Promise<void>;
  /** Structural checker: [] when healthy. */
  check(): Promise<string[]>;
  /** Clean stop. */
  close(): Promise<void>;
  /** Drops all in-memory state at once without writing anything (the crash). */
  abandon(): void;
}

export type ViolationKind =
  | 'oracle' // a sector read after recovery is not allowed
  | 'live-read' // a read during normal operation returned something not allowed
  | 'drain' // after recovery and drain, the backing device does not hold what the cache served
  | 'epoch-drain' // after recovery and drain, the backing device is not a prefix of the flush epochs
  | 'epoch-backing' // the raw backing device of a crash state is not a prefix of the flush epochs
  | 'unstable' // a second recovery (possibly after a crash during the first) read different bytes
  | 'check' // the target's structural checker reported problems
  | 'open' // the target failed to open (recover)
  | 'error'; // the target threw something that is not a PcacheError (including assertions)

export interface Violation {
  readonly kind: ViolationKind;
  /** The workload (exhaustive) or run and segment (randomized). */
  readonly workload: string;
  /** The crash boundary (device events before the crash), when the violation is tied to one. */
  readonly crashPoint: number | undefined;
  /** The crash state of each device, when the violation is tied to one. */
  readonly state: string | undefined;
  readonly details: readonly string[];
  /** A one-line command that replays the failure. */
  readonly replay: string;
}

export interface HarnessReport {
  readonly target: string;
  readonly mode: 'exhaustive' | 'randomized';
  readonly seed: number;
  workloads: number;
  crashPoints: number;
  /** Distinct crash states opened, each with its stability and crash-during-recovery checks. */
  statesExplored: number;
  /** Times the target was opened on a crash state (first recoveries and second ones). */
  recoveries: number;
  /** (crash point, crash state) pairs checked against the oracle. */
  stateChecks: number;
  /** Client requests that failed with a PcacheError (allowed; never required by the oracle). */
  failedRequests: number;
  /** The first violationsMax violations. */
  readonly violations: Violation[];
  violationsTotal: number;
  /** True when the run stopped at violationsMax. */
  stoppedEarly: boolean;
}

export interface HarnessOptions {
  /** Names the target in reports and replay commands. */
  readonly name: string;
  readonly target: CrashTarget;
  readonly cacheSizeBytes: number;
  readonly backingSizeBytes: number;
  readonly cacheIdentity?: string;
  readonly backingIdentity?: string;
  /**
   * Whether the cache device offers synchronous I/O (default true, as a cache file does). With
   * false every cache read and write completes later, so work the engine finishes within one
   * call on a blocking device (a hit, a rewrite) interleaves with other requests.
   */
  readonly cacheBlocking?: boolean;
  /** Default 1. */
  readonly seed?: number;
  /** Bytes of the exported device read and checked after each recovery. Default: all of it. */
  readonly checkSizeBytes?: number;
  /** Crash at every prefix of recovery's own writes and recover again. Default true. */
  readonly recoveryCrashes?: boolean;
  /**
   * After recovery, drain and close, then require the backing device to hold exactly what the
   * recovered target served, and a prefix of the flush epochs. Default true.
   */
  readonly drainCheck?: boolean;
  /** Check the raw backing device of every crash state holds an epoch prefix. Default true. */
  readonly rawBackingCheck?: boolean;
  /** Stop after this many violations. Default 20. */
  readonly violationsMax?: number;
  /** Where the seed, violations and summary go. Default: standard error. */
  readonly log?: (line: string) => void;
  /** Turns a replay spec into a command line. */
  readonly replayCommand?: (spec: string) => string;
  /** A spec printed by an earlier run: replays only that workload or run. */
  readonly replay?: string;
  /**
   * Writes a crash may leave as garbage (whole 512-byte sectors holding neither the old nor
   * the new bytes), by device: the crash states then include garbage-prefix and
   * garbage-with-omit states (exhaustive) and random garbage (randomized). Default: none.
   */
  readonly garbage?: (device: string, write: VolatileWrite) => boolean;
  /**
   * Devices with history to start from instead of freshly formatted ones (say, a log about to
   * wrap, or the state a crash left). The harness recovers the target on them, reads what it
   * serves (the oracle's initial values), drains, closes and settles; every workload (every
   * randomized run) starts from the result. Sectors must hold self-describing payloads or
   * zeroes, with payload ids the workloads do not use (above 100,000, say).
   */
  readonly base?: BaseSpec;
}

/** The two devices' contents. */
export interface SystemImages {
  readonly cache: PageImage;
  readonly backing: PageImage;
}

export interface BaseSpec {
  /** Names the base in reports and replay specs. */
  readonly name: string;
  readonly build: () => Promise<SystemImages>;
}

export interface ExhaustiveOptions extends HarnessOptions {
  /** Default 4096. */
  readonly blockSizeBytes?: number;
  /** Blocks the workloads address. Default 3. */
  readonly blockCount?: number;
  /** Payload values per block. Default 2. */
  readonly valueCount?: number;
  /** Longest operation, in blocks. Default 1. */
  readonly extentBlocksMax?: number;
  /** Default 3. */
  readonly opsMax?: number;
  /** Default: write, FUA write, flush, trim, write zeroes, writeback step, GC step. */
  readonly kinds?: readonly OpKind[];
  readonly tear?: TearOptions;
  /** Bound on (cache state, backing state) pairs per crash point. Default 64. */
  readonly pairsMax?: number;
  /** Run only workloads whose index is `index` modulo `count` (to split over processes). */
  readonly shard?: { readonly index: number; readonly count: number };
  /** Stop after this many workloads. Default: all. */
  readonly workloadsMax?: number;
  /** Read the whole checked range at the end of each workload and check it. Default true. */
  readonly finalRead?: boolean;
  /**
   * Chosen workloads (their text forms, "W0.1,flush,wb") to run instead of the enumeration:
   * scenarios longer than any enumeration reaches, each still crashed at every boundary.
   */
  readonly workloads?: readonly string[];
}

export interface RandomizedOptions extends HarnessOptions {
  /** Runs with seeds seed, seed+1, ...; default 4. */
  readonly runs?: number;
  /** Crash-and-recover segments per run. Default 3. */
  readonly segmentsPerRun?: number;
  /** Operations per segment. Default 200. */
  readonly opsPerSegment?: number;
  /** Client requests in flight at once. Default 8. */
  readonly inflightMax?: number;
  /** Random crash instants per segment (the end of the segment is always one more). Default 4. */
  readonly crashPointsPerSegment?: number;
  /**
   * More crash instants per segment, drawn among the instants just before a sync of a device
   * completes: where the most writes are volatile at once, so a state can drop or keep each
   * of them (an update and the mirror of the one before it, a key_tail and the data written
   * into a segment freed behind it). Default 0.
   */
  readonly preSyncCrashPointsPerSegment?: number;
  /** States per crash instant (per device and paired). Default 16. */
  readonly statesPerCrashPoint?: number;
  /** Default 4096. */
  readonly blockSizeBytes?: number;
  /** Default 16. */
  readonly blockCount?: number;
  /** Default 4. */
  readonly extentBlocksMax?: number;
  readonly weights?: Partial<OpWeights>;
  /** Order in which the devices complete concurrent operations. Default 'random'. */
  readonly completionOrder?: CompletionOrder;
}

const violationsMaxDefault = 20;
const eventsPerWorkloadMax = 1_000_000;
const inflightLimit = 1024;
const sectorsPerViolationShown = 8;

/** Where workloads start: the devices, and what the target served from them (undefined: zeroes). */
interface Baseline extends SystemImages {
  readonly values: Float64Array | undefined;
}

interface SystemPoint {
  readonly cache: CrashPoint;
  readonly backing: CrashPoint;
}

interface System {
  readonly cache: SimDevice;
  readonly backing: SimDevice;
  readonly events: DeviceEventLog;
}

interface StateResult {
  /** Sector values read after the first recovery; undefined if it could not open or read. */
  readonly values: Float64Array | undefined;
  /** Backing sector values after drain and close. */
  readonly drained: Float64Array | undefined;
  /** Raw backing sector values of the crash state. */
  readonly rawBacking: Float64Array | undefined;
  /** Raw backing sector values of crash states (prefix, omit-one) taken during the drain. */
  readonly drainBacking: readonly { readonly label: string; readonly values: SectorValuesDelta }[];
  /** Crash-point-independent problems: open, check, unstable, error. */
  readonly problems: { kind: ViolationKind; details: string[] }[];
  reported: boolean;
}

interface Context {
  readonly workload: string;
  readonly replaySpec: string;
}

/** The exhaustive driver. */
/** A long run reports how far it has got at least this often (wall clock). */
const progressIntervalMs = 20_000;

export async function runExhaustive(options: ExhaustiveOptions): Promise<HarnessReport> {
  const seed = options.seed ?? 1;
  const session = new Session(options, 'exhaustive', seed);
  const replay = session.parseReplay('exhaustive');
  const blockSizeBytes = options.blockSizeBytes ?? 4096;
  const alphabet = {
    kinds: options.kinds ?? exhaustiveOpKinds,
    blockCount: options.blockCount ?? 3,
    valueCount: options.valueCount ?? 2,
    extentBlocksMax: options.extentBlocksMax ?? 1,
  };
  assert(blockSizeBytes % sectorSizeBytes === 0, 'blocks are whole sectors');
  assert(alphabet.blockCount * blockSizeBytes <= session.checkBytes, 'the workload blocks lie inside the checked range');
  const shard = options.shard ?? { index: 0, count: 1 };
  assert(shard.index >= 0 && shard.index < shard.count, 'shard index is below the shard count');
  const chosen = options.workloads;
  session.start(`blocks=${alphabet.blockCount}x${blockSizeBytes} values=${alphabet.valueCount} ${chosen === undefined ? `ops<=${options.opsMax ?? 3}` : `${chosen.length} chosen workloads`}`);
  const base = await session.baseline();
  const workloads =
    replay?.workload !== undefined ? [parseWorkload(replay.workload)]
    : chosen !== undefined ? chosen.map(parseWorkload)
    : enumerateWorkloads(enumerateOps(alphabet), options.opsMax ?? 3);
  let index = -1;
  let done = 0;
  for (const ops of workloads) {
    index += 1;
    if (replay === undefined && index % shard.count !== shard.index) continue;
    if (done >= (options.workloadsMax ?? Number.POSITIVE_INFINITY)) break;
    done += 1;
    await session.exhaustiveWorkload(ops, base, { blockSizeBytes, pairsMax: options.pairsMax ?? 64, tear: options.tear ?? {}, finalRead: options.finalRead ?? true });
    session.progress();
    if (session.full) break;
  }
  return session.finish();
}

/** The randomized deep driver. */
export async function runRandomized(options: RandomizedOptions): Promise<HarnessReport> {
  const seed = options.seed ?? 1;
  const session = new Session(options, 'randomized', seed);
  const replay = session.parseReplay('randomized');
  const runs = replay !== undefined ? 1 : (options.runs ?? 4);
  const config: RandomConfig = {
    segments: options.segmentsPerRun ?? 3,
    ops: options.opsPerSegment ?? 200,
    inflightMax: options.inflightMax ?? 8,
    crashPoints: options.crashPointsPerSegment ?? 4,
    preSyncCrashPoints: options.preSyncCrashPointsPerSegment ?? 0,
    states: options.statesPerCrashPoint ?? 16,
    blockSizeBytes: options.blockSizeBytes ?? 4096,
    blockCount: options.blockCount ?? 16,
    extentBlocksMax: options.extentBlocksMax ?? 4,
    weights: { ...defaultOpWeights, ...options.weights },
    order: options.completionOrder ?? 'random',
  };
  assert(config.inflightMax >= 1 && config.inflightMax <= inflightLimit, `in-flight bound must be in [1, ${inflightLimit}]`);
  assert(config.blockCount * config.blockSizeBytes <= session.checkBytes, 'the workload blocks lie inside the checked range');
  session.start(`runs=${runs} segments=${config.segments} ops=${config.ops} inflight<=${config.inflightMax}`);
  const base = await session.baseline();
  for (let run = 0; run < runs; run += 1) {
    await session.randomRun(seed + run, base, config);
    session.progress();
    if (session.full) break;
  }
  return session.finish();
}

interface RandomConfig {
  readonly segments: number;
  readonly ops: number;
  readonly inflightMax: number;
  readonly crashPoints: number;
  readonly preSyncCrashPoints: number;
  readonly states: number;
  readonly blockSizeBytes: number;
  readonly blockCount: number;
  readonly extentBlocksMax: number;
  readonly weights: OpWeights;
  readonly order: CompletionOrder;
}

class Session {
  readonly report: HarnessReport;
  readonly checkBytes: number;
  private readonly scratchBuffers = new Map<'image' | 'again', Uint8Array>();
  /**
   * Decoders of the backing images a state yields (raw, after its drain, and the durable
   * images under the drain's crash states), one per use so that each decodes an image like
   * its previous one: only the pages where the two differ (sector_delta.ts).
   */
  private readonly decoders: Record<'raw' | 'drained' | 'drainBase', ImageDecoder>;
  private readonly log: (line: string) => void;
  private readonly startedMs: number;
  private lastProgressMs: number;
  private readonly violationsMax: number;
  private readonly replayCommand: (spec: string) => string;

  constructor(
    private readonly options: HarnessOptions,
    mode: 'exhaustive' | 'randomized',
    private readonly seed: number,
  ) {
    assert(/^[\w.-]+$/.test(options.name), `target names are plain words: "${options.name}"`);
    this.checkBytes = options.checkSizeBytes ?? options.backingSizeBytes;
    assert(this.checkBytes % sectorSizeBytes === 0 && this.checkBytes <= options.backingSizeBytes, 'the checked range is whole sectors of the backing device');
    this.startedMs = performance.now();
    this.lastProgressMs = this.startedMs;
    this.log = options.log ?? ((line) => process.stderr.write(`${line}\n`));
    this.violationsMax = options.violationsMax ?? violationsMaxDefault;
    const decoder = (): ImageDecoder => new ImageDecoder(this.checkBytes / sectorSizeBytes, (image) => this.imageValues(image));
    this.decoders = { raw: decoder(), drained: decoder(), drainBase: decoder() };
    this.replayCommand = options.replayCommand ?? ((spec) => `PCACHE_SIM_REPLAY='${spec}' node scripts/run_tests.mjs sim`);
    this.report = {
      target: options.name,
      mode,
      seed,
      workloads: 0,
      crashPoints: 0,
      statesExplored: 0,
      recoveries: 0,
      stateChecks: 0,
      failedRequests: 0,
      violations: [],
      violationsTotal: 0,
      stoppedEarly: false,
    };
  }

  get full(): boolean {
    return this.report.violationsTotal >= this.violationsMax;
  }

  parseReplay(mode: 'exhaustive' | 'randomized'): { workload: string | undefined } | undefined {
    const spec = this.options.replay;
    if (spec === undefined) return undefined;
    const fields = new Map<string, string>();
    for (const part of spec.trim().split(/\s+/)) {
      const equals = part.indexOf('=');
      if (equals <= 0) throw new PcacheError('EINVAL', `replay spec field is not key=value: "${part}"`);
      fields.set(part.slice(0, equals), part.slice(equals + 1));
    }
    if (fields.get('target') !== this.options.name) throw new PcacheError('EINVAL', `replay spec is for target ${fields.get('target') ?? '?'}, not ${this.options.name}`);
    if (fields.get('mode') !== mode) throw new PcacheError('EINVAL', `replay spec is for mode ${fields.get('mode') ?? '?'}, not ${mode}`);
    if (Number(fields.get('seed')) !== this.seed) throw new PcacheError('EINVAL', `replay spec seed ${fields.get('seed') ?? '?'} differs from the run's seed ${this.seed}`);
    if (fields.get('base') !== this.options.base?.name) throw new PcacheError('EINVAL', `replay spec is for base ${fields.get('base') ?? '(none)'}, not ${this.options.base?.name ?? '(none)'}`);
    return { workload: fields.get('workload') };
  }

  start(shape: string): void {
    const spec = this.specPrefix(this.report.mode, this.seed);
    const base = this.options.base === undefined ? '' : ` base=${this.options.base.name}`;
    this.log(`pcache-sim ${this.report.mode}: target=${this.options.name} seed=${this.seed}${base} ${shape}${this.options.replay === undefined ? '' : ' (replay)'}`);
    this.log(`pcache-sim rerun: ${this.replayCommand(spec)}`);
  }

  /**
   * A line saying how far the run has got, at most every progressIntervalMs of wall-clock time:
   * a long run (minutes) must show that it is alive. Real time, not the simulator's clock.
   */
  progress(): void {
    const now = performance.now();
    if (now - this.lastProgressMs < progressIntervalMs) return;
    this.lastProgressMs = now;
    const r = this.report;
    this.log(`pcache-sim ${r.mode}: target=${r.target}: ${r.workloads} workloads, ${r.statesExplored} crash states, ${r.violationsTotal} violations so far (${Math.round((now - this.startedMs) / 1000)} s)`);
  }

  finish(): HarnessReport {
    const r = this.report;
    this.log(
      `pcache-sim ${r.mode}: target=${r.target} seed=${r.seed}: ${r.workloads} workloads, ${r.crashPoints} crash points, ` +
        `${r.statesExplored} crash states explored (${r.recoveries} recoveries, ${r.stateChecks} checks), ` +
        `${r.failedRequests} failed requests, ${r.violationsTotal} violations${r.stoppedEarly ? ' (stopped early)' : ''}`,
    );
    return r;
  }

  /**
   * The devices every workload starts from: freshly formatted, or the base recovered, drained
   * (so the backing device holds what is served), cleanly closed and settled. What the base
   * serves is read from a copy, abandoned afterwards: a read changes a cache (misses fill it),
   * and the base is meant to be left as built.
   */
  async baseline(): Promise<Baseline> {
    const base = this.options.base;
    const system = this.newSystem(base === undefined ? undefined : await base.build(), undefined);
    const opened = await this.options.target.open(system.cache, system.backing);
    if (base !== undefined) await opened.drain();
    await opened.close();
    system.cache.settle();
    system.backing.settle();
    const images = { cache: system.cache.durableImage(), backing: system.backing.durableImage() };
    if (base === undefined) return { ...images, values: undefined };
    const copy = this.newSystem(images, undefined);
    const reader = await this.options.target.open(copy.cache, copy.backing);
    const reads = new Uint8Array(this.checkBytes);
    await reader.read(reads, 0);
    reader.abandon();
    copy.cache.powerOff();
    copy.backing.powerOff();
    return { ...images, values: sectorValues(reads, 0) };
  }

  /** The oracle's initial value of each sector: what the baseline served. */
  private initialOf(values: Float64Array | undefined): { initial?: (sector: number) => number } {
    return values === undefined ? {} : { initial: (sector: number) => values[sector] ?? 0 };
  }

  /** The crash-state options of `device`: the garbage it may be left with. */
  private garbageFor(device: string): { garbage?: GarbagePredicate } {
    const garbage = this.options.garbage;
    return garbage === undefined ? {} : { garbage: (write) => garbage(device, write) };
  }

  /** The replay-spec fields every spec of this run carries: target, mode, seed and base. */
  private specPrefix(mode: 'exhaustive' | 'randomized', seed: number): string {
    const base = this.options.base === undefined ? '' : ` base=${this.options.base.name}`;
    return `target=${this.options.name} mode=${mode} seed=${seed}${base}`;
  }

  async exhaustiveWorkload(ops: readonly WorkloadOp[], base: Baseline, config: { blockSizeBytes: number; pairsMax: number; tear: TearOptions; finalRead: boolean }): Promise<void> {
    const text = workloadText(ops);
    const context: Context = { workload: text, replaySpec: `${this.specPrefix('exhaustive', this.seed)} workload=${text}` };
    const prng = new Prng(this.seed);
    const system = this.newSystem(base, undefined);
    const snapshots: SystemPoint[] = [capture(system)];
    const stopListening = system.events.listen(() => {
      assert(snapshots.length < eventsPerWorkloadMax, `more than ${eventsPerWorkloadMax} device events in one workload`);
      snapshots.push(capture(system));
    });
    const history = new RequestHistory({ sizeBytes: this.checkBytes, clock: () => system.events.now, ...this.initialOf(base.values) });
    this.report.workloads += 1;
    try {
      let opened: OpenTarget;
      try {
        opened = await this.options.target.open(system.cache, system.backing);
      } catch (error) {
        this.addViolation(context, 'open', undefined, undefined, [`opening the clean base image failed: ${describeError(error)}`]);
        return;
      }
      for (const op of ops) {
        const failure = await this.perform(opened, op, history, { blockSizeBytes: config.blockSizeBytes, payloadId: op.kind === 'write' ? op.value : 0 });
        if (failure !== undefined) {
          this.addViolation(context, 'error', undefined, undefined, [failure]);
          break;
        }
      }
      if (config.finalRead) {
        const failure = await this.perform(opened, { kind: 'read', extent: { block: 0, blocks: this.checkBytes / config.blockSizeBytes } }, history, {
          blockSizeBytes: config.blockSizeBytes,
          payloadId: 0,
          onLiveViolations: (violations) => this.addViolation(context, 'live-read', undefined, undefined, violations.map(formatViolation)),
        });
        if (failure !== undefined) this.addViolation(context, 'error', undefined, undefined, [failure]);
      }
      opened.abandon();
    } finally {
      stopListening();
      system.cache.powerOff();
      system.backing.powerOff();
    }
    assert(snapshots.length === system.events.now + 1, 'one snapshot per crash boundary');
    const results = new Map<string, StateResult>();
    for (let boundary = 0; boundary < snapshots.length; boundary += 1) {
      const point = snapshots[boundary];
      assert(point !== undefined, 'boundary is inside the snapshot list');
      const cacheStates = standardStates(point.cache, prng, { tear: config.tear, ...this.garbageFor(point.cache.device) });
      const backingStates = standardStates(point.backing, prng, { tear: config.tear, ...this.garbageFor(point.backing.device) });
      await this.checkCrashPoint(context, history.cut(boundary), boundary, combineStates(cacheStates, backingStates, prng, config.pairsMax), results);
      if (this.full) return;
      this.progress();
    }
  }

  async randomRun(runSeed: number, base: Baseline, config: RandomConfig): Promise<void> {
    const prng = new Prng(runSeed);
    let images: SystemImages = base;
    let initial = base.values;
    let nextValue = 1;
    for (let segment = 0; segment < config.segments; segment += 1) {
      const context: Context = {
        workload: `run seed=${runSeed} segment=${segment}`,
        replaySpec: this.specPrefix('randomized', runSeed),
      };
      // Separate streams, so the operations drawn do not depend on how events interleave.
      const opsPrng = prng.fork();
      const crashPrng = prng.fork();
      const statePrng = prng.fork();
      const system = this.newSystem(images, new IoScheduler({ order: config.order, seed: prng.nextSeed() }));
      const history = new RequestHistory({ sizeBytes: this.checkBytes, clock: () => system.events.now, ...this.initialOf(initial) });
      // Reservoir sampling: a uniform choice of crash instants among events not yet known, and
      // another among the instants right before a sync completes (the previous boundary).
      const uniform = new Reservoir<{ boundary: number; point: SystemPoint }>(config.crashPoints, crashPrng);
      const preSync = new Reservoir<{ boundary: number; point: SystemPoint }>(config.preSyncCrashPoints, crashPrng);
      // Only the pre-sync sample needs every instant captured (a crash point copies the volatile list).
      let previous: { boundary: number; point: SystemPoint } | undefined;
      const stopListening = system.events.listen((event) => {
        if (event.kind === 'sync' && event.phase === 'complete' && previous !== undefined) preSync.offer(() => previous as { boundary: number; point: SystemPoint });
        const now = config.preSyncCrashPoints > 0 ? { boundary: event.seq, point: capture(system) } : undefined;
        uniform.offer(() => now ?? { boundary: event.seq, point: capture(system) });
        previous = now;
      });
      this.report.workloads += 1;
      try {
        const ops = Array.from({ length: config.ops }, () =>
          randomOp(opsPrng, {
            blockCount: config.blockCount,
            extentBlocksMax: config.extentBlocksMax,
            weights: config.weights,
            nextValue: () => {
              const value = nextValue;
              nextValue += 1;
              return value;
            },
          }),
        );
        let opened: OpenTarget;
        try {
          opened = await this.options.target.open(system.cache, system.backing);
        } catch (error) {
          this.addViolation(context, 'open', undefined, undefined, [`opening failed: ${describeError(error)}`]);
          return;
        }
        const failure = await this.runConcurrently(opened, ops, history, config, context);
        if (failure !== undefined) this.addViolation(context, 'error', undefined, undefined, [failure]);
        uniform.add({ boundary: system.events.now, point: capture(system) });
        opened.abandon();
      } finally {
        stopListening();
        system.cache.powerOff();
        system.backing.powerOff();
      }
      const byBoundary = new Map<number, { boundary: number; point: SystemPoint }>();
      for (const sample of [...uniform.items, ...preSync.items]) byBoundary.set(sample.boundary, sample);
      const sampled = [...byBoundary.values()].sort((a, b) => a.boundary - b.boundary);
      const results = new Map<string, StateResult>();
      const explored: SystemCrashState[] = [];
      for (const { boundary, point } of sampled) {
        const cacheStates = randomStates(point.cache, statePrng, config.states, this.garbageFor(point.cache.device));
        const backingStates = randomStates(point.backing, statePrng, config.states, this.garbageFor(point.backing.device));
        const pairs = combineStates(cacheStates, backingStates, statePrng, config.states);
        await this.checkCrashPoint(context, history.cut(boundary), boundary, pairs, results);
        explored.push(...pairs);
        if (this.full) return;
        this.progress();
      }
      // Continue from one crash state, recovered and drained, so later segments run on devices
      // with history. Draining first makes the backing device agree with the exported contents,
      // which the epoch-prefix checks of the next segment take as their starting point.
      const next = await this.continueFrom(statePrng.pick(explored));
      if (next === undefined) return;
      images = next.images;
      initial = next.values;
    }
  }

  private async continueFrom(pair: SystemCrashState): Promise<{ images: SystemImages; values: Float64Array } | undefined> {
    const cache = materialize(pair.cache);
    const backing = materialize(pair.backing);
    try {
      const recovered = await this.recover(cache, backing);
      if (recovered.opened === undefined || recovered.values === undefined || recovered.problems.length > 0) {
        recovered.opened?.abandon();
        return undefined;
      }
      await recovered.opened.drain();
      await recovered.opened.close();
      cache.settle();
      backing.settle();
      return { images: { cache: cache.durableImage(), backing: backing.durableImage() }, values: recovered.values };
    } catch {
      // The same state was explored and its failures reported already; the run just ends here.
      return undefined;
    } finally {
      cache.powerOff();
      backing.powerOff();
    }
  }

  private async runConcurrently(opened: OpenTarget, ops: readonly WorkloadOp[], history: RequestHistory, config: RandomConfig, context: Context): Promise<string | undefined> {
    const inFlight = new Set<Promise<string | undefined>>();
    let background: Promise<string | undefined> | undefined;
    let failure: string | undefined;
    const track = (promise: Promise<string | undefined>): void => {
      inFlight.add(promise);
      void promise.then((result) => {
        inFlight.delete(promise);
        failure ??= result;
      });
    };
    const start = (op: WorkloadOp): Promise<string | undefined> =>
      this.perform(opened, op, history, {
        blockSizeBytes: config.blockSizeBytes,
        payloadId: op.kind === 'write' ? op.value : 0,
        onLiveViolations: (violations) => this.addViolation(context, 'live-read', undefined, undefined, violations.map(formatViolation)),
      });
    for (const op of ops) {
      if (failure !== undefined) break;
      if (op.kind === 'writeback' || op.kind === 'gc') {
        // Background steps overlap client requests but never each other, as in the engine:
        // the previous one finishes before the next one starts.
        if (background !== undefined) failure ??= await background;
        background = start(op);
        continue;
      }
      while (inFlight.size >= config.inflightMax) failure ??= await Promise.race(inFlight);
      track(start(op));
    }
    for (const result of await Promise.all(inFlight)) failure ??= result;
    if (background !== undefined) failure ??= await background;
    return failure;
  }

  /**
   * Issues one operation and records it in the history. Resolves to a description of an
   * unexpected failure (anything but a PcacheError), or undefined.
   */
  private perform(
    opened: OpenTarget,
    op: WorkloadOp,
    history: RequestHistory,
    config: { blockSizeBytes: number; payloadId: number; onLiveViolations?: (violations: SectorViolation[]) => void },
  ): Promise<string | undefined> {
    const offsetOf = (block: number): number => block * config.blockSizeBytes;
    let request: HistoryRequest | undefined;
    let call: () => MaybePromise<void>;
    let readBuffer: Uint8Array | undefined;
    switch (op.kind) {
      case 'write': {
        const data = new Uint8Array(op.extent.blocks * config.blockSizeBytes);
        const offset = offsetOf(op.extent.block);
        fillPayload(data, offset, config.payloadId);
        request = history.issueWrite(offset, data.length, config.payloadId, { fua: op.fua });
        call = () => opened.write(data, offset, { fua: op.fua });
        break;
      }
      case 'trim': {
        const offset = offsetOf(op.extent.block);
        const length = op.extent.blocks * config.blockSizeBytes;
        request = history.issueTrim(offset, length, { fua: op.fua });
        call = () => opened.trim(offset, length, { fua: op.fua });
        break;
      }
      case 'writeZeroes': {
        const offset = offsetOf(op.extent.block);
        const length = op.extent.blocks * config.blockSizeBytes;
        request = history.issueWriteZeroes(offset, length, { fua: op.fua });
        call = () => opened.writeZeroes(offset, length, { fua: op.fua, fastZero: false });
        break;
      }
      case 'read': {
        const buffer = new Uint8Array(op.extent.blocks * config.blockSizeBytes);
        const offset = offsetOf(op.extent.block);
        readBuffer = buffer;
        request = history.issueRead(offset, buffer.length);
        call = () => opened.read(buffer, offset);
        break;
      }
      case 'flush':
        request = history.issueFlush();
        call = () => opened.flush();
        break;
      case 'writeback':
        call = () => opened.writebackStep();
        break;
      case 'gc':
        call = () => opened.gcStep();
        break;
    }
    return invoke(call).then(
      () => {
        if (request === undefined) return undefined;
        history.reply(request, true);
        if (readBuffer !== undefined) {
          const violations = history.checkRead(request, readBuffer);
          if (violations.length > 0) config.onLiveViolations?.(violations);
        }
        return undefined;
      },
      (error: unknown) => {
        if (request !== undefined) history.reply(request, false);
        if (isPcacheError(error)) {
          if (request !== undefined) this.report.failedRequests += 1;
          return undefined;
        }
        return `${opText(op)} threw ${describeError(error)}`;
      },
    );
  }

  private async checkCrashPoint(context: Context, view: OracleView, boundary: number, pairs: readonly SystemCrashState[], results: Map<string, StateResult>): Promise<void> {
    this.report.crashPoints += 1;
    for (const pair of pairs) {
      let result = results.get(pair.key);
      if (result === undefined) {
        result = await this.explore(pair);
        results.set(pair.key, result);
      }
      this.report.stateChecks += 1;
      const state = stateText(pair);
      if (!result.reported) {
        result.reported = true;
        for (const problem of result.problems) this.addViolation(context, problem.kind, boundary, state, problem.details);
      }
      if (result.values !== undefined) {
        const violations = view.checkValues(result.values, 0);
        if (violations.length > 0) this.addViolation(context, 'oracle', boundary, state, explain(view, violations));
      }
      if (result.drained !== undefined) {
        const epoch = view.checkEpochPrefix(result.drained, 0);
        if (epoch.violations.length > 0) this.addViolation(context, 'epoch-drain', boundary, state, explain(view, epoch.violations));
      }
      if (result.rawBacking !== undefined) {
        const epoch = view.checkEpochPrefix(result.rawBacking, 0);
        if (epoch.violations.length > 0) this.addViolation(context, 'epoch-backing', boundary, state, explain(view, epoch.violations));
      }
      for (const drainState of result.drainBacking) {
        const epoch = view.checkEpochPrefixDelta(drainState.values);
        if (epoch.violations.length === 0) continue;
        this.addViolation(context, 'epoch-backing', boundary, `${state}; ${drainState.label}`, explain(view, epoch.violations));
        break;
      }
      if (this.full) return;
    }
  }

  /** Opens the target on one crash state and collects everything checks need from it. */
  private async explore(pair: SystemCrashState): Promise<StateResult> {
    this.report.statesExplored += 1;
    const events = new DeviceEventLog({ recordedEventsMax: 0 });
    const cache = materialize(pair.cache, { events });
    const backing = materialize(pair.backing, { events });
    const problems: { kind: ViolationKind; details: string[] }[] = [];
    const rawBackingCheck = this.options.rawBackingCheck ?? true;
    const rawBacking = rawBackingCheck ? this.decoders.raw.values(backing.visibleImage()) : undefined;
    const drainPoints: CrashPoint[] = [];
    const recoveryCrashes = this.options.recoveryCrashes ?? true;
    const recoveryPoints: SystemPoint[] = [];
    const system: System = { cache, backing, events };
    if (recoveryCrashes) recoveryPoints.push(capture(system));
    const stopListening = events.listen((event) => {
      // With every write applied, only writes change a crash state: syncs need no snapshot.
      if (!recoveryCrashes || event.kind !== 'write' || event.phase === 'fail') return;
      assert(recoveryPoints.length < eventsPerWorkloadMax, `more than ${eventsPerWorkloadMax} writes in one recovery`);
      recoveryPoints.push(capture(system));
    });
    let values: Float64Array | undefined;
    let reads: Uint8Array | undefined;
    let drained: Float64Array | undefined;
    try {
      const first = await this.recover(cache, backing, true);
      problems.push(...first.problems);
      stopListening();
      values = first.values;
      reads = first.reads;
      if (first.opened !== undefined) {
        if (this.options.drainCheck ?? true) {
          const stopDrainCapture = rawBackingCheck
            ? events.listen((event) => {
                if (event.device !== backing.name) return;
                assert(drainPoints.length < eventsPerWorkloadMax, `more than ${eventsPerWorkloadMax} backing events in one drain`);
                drainPoints.push(backing.crashPoint());
              })
            : undefined;
          try {
            await first.opened.drain();
            await first.opened.close();
            const drainedImage = backing.visibleImage();
            const backingBytes = this.imageBytes(drainedImage);
            drained = this.decoders.drained.values(drainedImage);
            if (reads !== undefined) {
              const differences = compareReads(reads, backingBytes, 0);
              if (differences.length > 0) problems.push({ kind: 'drain', details: ['after drain the backing device differs from what the cache served:', ...describeSectors(differences)] });
            }
          } catch (error) {
            problems.push({ kind: isPcacheError(error) ? 'check' : 'error', details: [`drain and close after recovery failed: ${describeError(error)}`] });
          } finally {
            stopDrainCapture?.();
          }
        } else {
          first.opened.abandon();
        }
      }
    } finally {
      stopListening();
      cache.powerOff();
      backing.powerOff();
    }
    if (recoveryCrashes && reads !== undefined) await this.crashDuringRecovery(recoveryPoints, reads, problems);
    return { values, drained, rawBacking, drainBacking: this.drainBackingStates(drainPoints), problems, reported: false };
  }

  /**
   * The backing device's own crash states while the drain wrote to it: prefixes and omit-one
   * (untorn: tearing tests sector atomicity, which the epoch rule is not about).
   */
  private drainBackingStates(points: readonly CrashPoint[]): { label: string; values: SectorValuesDelta }[] {
    const states = new CrashStateSet();
    const prng = new Prng(this.seed);
    for (const point of points) for (const state of standardStates(point, prng, { tornLast: false })) states.add(state);
    // Hundreds of states on a few durable images: decode each image once, then what differs.
    const decoder = new DeltaDecoder(this.checkBytes / sectorSizeBytes, this.decoders.drainBase);
    return states.list.map((state) => ({ label: `during drain: ${state.label}`, values: decoder.valuesOf(state) }));
  }

  /** Crashes at every prefix of recovery's writes and requires the next recovery to read the same. */
  private async crashDuringRecovery(points: readonly SystemPoint[], reads: Uint8Array, problems: { kind: ViolationKind; details: string[] }[]): Promise<void> {
    const seen = new Set<string>();
    for (const [index, point] of points.entries()) {
      const cacheState = prefixState(point.cache, point.cache.volatile.length);
      const backingState = prefixState(point.backing, point.backing.volatile.length);
      const key = `${cacheState.key}|${backingState.key}`;
      if (seen.has(key)) continue;
      seen.add(key);
      const where = index === 0 ? 'a second recovery from the same state' : `a recovery after crashing at recovery's write ${index}`;
      const cache = materialize(cacheState);
      const backing = materialize(backingState);
      try {
        const again = await this.recover(cache, backing, false, this.scratch('again'));
        for (const problem of again.problems) problems.push({ kind: problem.kind, details: [`in ${where}:`, ...problem.details] });
        again.opened?.abandon();
        if (again.reads !== undefined) {
          const differences = compareReads(reads, again.reads, 0);
          if (differences.length > 0) problems.push({ kind: 'unstable', details: [`${where} read different data:`, ...describeSectors(differences)] });
        }
      } finally {
        cache.powerOff();
        backing.powerOff();
      }
      if (problems.length > 0) return;
    }
  }

  /**
   * Opens the target, checks it right after recovery (before reads fill the cache over what
   * recovery left), reads the checked range and, when `checkAfterReads` (the first recovery of
   * a state: once per state is enough to cover the read path), checks it again. The reads go
   * to `readsInto` when given (a reused buffer, for callers that only compare them; no values
   * are decoded then).
   */
  private async recover(cache: SimDevice, backing: SimDevice, checkAfterReads = false, readsInto?: Uint8Array): Promise<{ opened: OpenTarget | undefined; reads: Uint8Array | undefined; values: Float64Array | undefined; problems: { kind: ViolationKind; details: string[] }[] }> {
    const problems: { kind: ViolationKind; details: string[] }[] = [];
    this.report.recoveries += 1;
    let opened: OpenTarget;
    try {
      opened = await this.options.target.open(cache, backing);
    } catch (error) {
      problems.push({ kind: isPcacheError(error) ? 'open' : 'error', details: [`recovery failed: ${describeError(error)}`] });
      return { opened: undefined, reads: undefined, values: undefined, problems };
    }
    await this.structuralCheck(opened, 'right after recovery', problems);
    const reads = readsInto ?? new Uint8Array(this.checkBytes);
    try {
      await opened.read(reads, 0);
    } catch (error) {
      problems.push({ kind: isPcacheError(error) ? 'open' : 'error', details: [`reading after recovery failed: ${describeError(error)}`] });
      return { opened, reads: undefined, values: undefined, problems };
    }
    if (checkAfterReads && problems.length === 0) await this.structuralCheck(opened, 'after reading everything', problems);
    // A caller that reads into its own buffer only compares the bytes: no values to decode.
    return { opened, reads, values: readsInto === undefined ? sectorValues(reads, 0) : undefined, problems };
  }

  private async structuralCheck(opened: OpenTarget, when: string, problems: { kind: ViolationKind; details: string[] }[]): Promise<void> {
    try {
      const found = await opened.check();
      if (found.length > 0) problems.push({ kind: 'check', details: [`${when}:`, ...found] });
    } catch (error) {
      problems.push({ kind: 'error', details: [`the structural check ${when} threw: ${describeError(error)}`] });
    }
  }

  /** The checked range of `image`, in a buffer the next call reuses. */
  private imageBytes(image: ReadonlyPageImage): Uint8Array {
    const bytes = this.scratch('image');
    image.read(bytes, 0);
    return bytes;
  }

  /**
   * A buffer of the checked range's size, the same one every time for the same use: a state
   * reads the range about a dozen times, and fresh buffers of that size made the crash
   * simulator spend a fifth of its time collecting garbage. A caller is done with it before
   * the next call for the same use.
   */
  private scratch(use: 'image' | 'again'): Uint8Array {
    let buffer = this.scratchBuffers.get(use);
    if (buffer === undefined) {
      buffer = new Uint8Array(this.checkBytes);
      this.scratchBuffers.set(use, buffer);
    }
    return buffer;
  }

  private imageValues(image: ReadonlyPageImage): Float64Array {
    return sectorValues(this.imageBytes(image), 0);
  }

  private newSystem(images: SystemImages | undefined, scheduler: IoScheduler | undefined): System {
    const events = new DeviceEventLog({ recordedEventsMax: 0 });
    const common = scheduler === undefined ? { events } : { events, scheduler };
    const cacheOptions = {
      ...(this.options.cacheIdentity === undefined ? {} : { identity: this.options.cacheIdentity }),
      ...(this.options.cacheBlocking === false ? { blocking: false } : {}),
    };
    const backingIdentity = this.options.backingIdentity === undefined ? {} : { identity: this.options.backingIdentity };
    const cache =
      images === undefined
        ? SimDevice.blank(this.options.cacheSizeBytes, { ...common, name: 'cache', ...cacheOptions })
        : new SimDevice(images.cache.fork(), { ...common, name: 'cache', ...cacheOptions });
    const backing =
      images === undefined
        ? SimDevice.blank(this.options.backingSizeBytes, { ...common, name: 'backing', ...backingIdentity })
        : new SimDevice(images.backing.fork(), { ...common, name: 'backing', ...backingIdentity });
    return { cache, backing, events };
  }

  private addViolation(context: Context, kind: ViolationKind, crashPoint: number | undefined, state: string | undefined, details: readonly string[]): void {
    this.report.violationsTotal += 1;
    if (this.report.violations.length >= this.violationsMax) {
      this.report.stoppedEarly = true;
      return;
    }
    const violation: Violation = { kind, workload: context.workload, crashPoint, state, details, replay: this.replayCommand(context.replaySpec) };
    this.report.violations.push(violation);
    const where = crashPoint === undefined ? '' : ` crash at boundary ${crashPoint}`;
    this.log(`VIOLATION ${kind}: ${context.workload}${where}${state === undefined ? '' : ` [${state}]`}`);
    for (const line of details) this.log(`  ${line}`);
    this.log(`  replay: ${violation.replay}`);
    if (this.full) this.report.stoppedEarly = true;
  }
}

/** A uniform sample of up to `size` of the items offered (reservoir sampling), plus any added outright. */
class Reservoir<T> {
  readonly items: T[] = [];
  private seen = 0;

  constructor(
    private readonly size: number,
    private readonly prng: Prng,
  ) {}

  /** Offers one more item, made only if it is taken. */
  offer(make: () => T): void {
    if (this.size === 0) return;
    this.seen += 1;
    if (this.items.length < this.size) {
      this.items.push(make());
      return;
    }
    const slot = this.prng.nextInt(this.seen);
    if (slot < this.size) this.items[slot] = make();
  }

  add(item: T): void {
    this.items.push(item);
  }
}

function capture(system: System): SystemPoint {
  return { cache: system.cache.crashPoint(), backing: system.backing.crashPoint() };
}

function stateText(pair: SystemCrashState): string {
  return `cache: ${crashStateText(pair.cache)}; backing: ${crashStateText(pair.backing)}`;
}

function crashStateText(state: CrashState): string {
  return state.point.volatile.length === 0 ? 'nothing volatile' : state.label;
}

function describeSectors(violations: readonly SectorViolation[]): string[] {
  const lines = violations.slice(0, sectorsPerViolationShown).map(formatViolation);
  if (violations.length > sectorsPerViolationShown) lines.push(`... and ${violations.length - sectorsPerViolationShown} more sectors`);
  return lines;
}

/** The bad sectors, then the request history of the first one. */
function explain(view: OracleView, violations: readonly SectorViolation[]): string[] {
  const first = violations[0];
  return first === undefined ? [] : [...describeSectors(violations), ...view.explainSector(first.sector)];
}

function describeError(error: unknown): string {
  if (error instanceof AssertionFailure) return `assertion failure: ${error.message}`;
  if (isPcacheError(error)) return `${error.code}: ${error.message}`;
  if (error instanceof Error) return `${error.name}: ${error.message}`;
  return String(error);
}

function invoke(call: () => MaybePromise<void>): Promise<void> {
  try {
    return Promise.resolve(call());
  } catch (error) {
    return Promise.reject(error instanceof Error ? error : new Error(String(error)));
  }
}

function opText(op: WorkloadOp): string {
  return workloadText([op]);
}
