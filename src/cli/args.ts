// The command-line grammar: every command, its flags and help text, and the parsing and
// validation that turn argv into typed options.
//
// Invariants:
// - argv is read only here (main.ts hands it over); every value is validated here, once, so a
//   command module receives options that are already in range;
// - every rejection is a UsageError whose message names the offending flag and fits on one
//   line (main.ts prints it as `pcache: <message>` and exits with exitUsage);
// - help text is generated from the same table the parser uses, so the two cannot disagree.

import net from 'node:net';
import { parseArgs } from 'node:util';
import { isPcacheError } from '../lib/errors.js';
import { GiB, MiB, parseSize } from '../lib/units.js';
import { connectionsMax, defaultConnections } from '../nbd/client/remote_device.js';
import { looksLikeNbdUri, parseNbdUri } from '../nbd/client/uri.js';
import { busyPollWindowDefaultUs, busyPollWindowMaxUs } from '../nbd/server/busy_poll.js';
import { gcPercentMax, segmentSizeAlignBytes, segmentSizeMaxBytes, segmentSizeMinBytes } from '../ondisk/layout.js';
import { knobNamed, knobNames, knobValueProblem, watermarkProblem } from './settings.js';

/** Exit status: success. */
export const exitOk = 0;
/** Exit status: an operating error (a refused or failed operation, or `check` found problems). */
export const exitFailure = 1;
/** Exit status: the command line itself is wrong (unknown flag, missing flag, bad value). */
export const exitUsage = 2;
/** Exit status: a bug in pcache (a broken invariant); the stack trace is printed. */
export const exitInternal = 70;
/** Exit status: interrupted by Ctrl-C (SIGINT) while waiting; nothing was undone (128 + 2, as shells report it). */
export const exitInterrupted = 130;

/** A mistake in the command line. */
export class UsageError extends Error {
  override readonly name = 'UsageError';
}

export type CommandName = 'format' | 'serve' | 'status' | 'check' | 'drain' | 'set';

interface FlagSpec {
  readonly kind: 'string' | 'boolean';
  /** The placeholder shown in help for a string flag (PATH, SIZE, N). */
  readonly value?: string;
  readonly help: string;
}

interface CommandSpec {
  readonly summary: string;
  readonly usage: readonly string[];
  readonly flags: Readonly<Record<string, FlagSpec>>;
  /** Whether positional arguments are taken (only `set`: NAME VALUE pairs). */
  readonly positionals?: boolean;
  readonly notes: readonly string[];
}

const helpFlag: FlagSpec = { kind: 'boolean', help: 'show this help and exit' };

export const logLevels = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'] as const;
export type LogLevel = (typeof logLevels)[number];
/** How long `serve --drain-on-exit` waits for the drain before stopping anyway. */
const defaultDrainTimeoutSeconds = 300;

const specs: Readonly<Record<CommandName, CommandSpec>> = {
  format: {
    summary: 'format a cache device for a backing device',
    usage: ['pcache format --cache PATH --backing PATH|URI [--segment-size SIZE] [--data-crc] [--gc-percent N] [--force [--discard-dirty]]'],
    flags: {
      cache: { kind: 'string', value: 'PATH', help: 'the cache device: a file or a block device (required)' },
      backing: { kind: 'string', value: 'PATH|URI', help: 'the backing device it will cache: a file, a block device or an NBD URI (required)' },
      'cache-size': { kind: 'string', value: 'SIZE', help: 'create the cache file with this size (sparse) if it does not exist' },
      'segment-size': { kind: 'string', value: 'SIZE', help: 'bytes per segment, a multiple of 1M from 1M to 1G (default 16M)' },
      'data-crc': { kind: 'boolean', help: 'protect every cached extent with a CRC32C (fixed at format)' },
      'gc-percent': { kind: 'string', value: 'N', help: `start garbage collection when N% of segments are in use, 0..${gcPercentMax} (default 70)` },
      force: { kind: 'boolean', help: 'overwrite a device that is not blank (never discards dirty data on its own)' },
      'discard-dirty': { kind: 'boolean', help: 'with --force: also overwrite a cache that still holds dirty data, losing it' },
      help: helpFlag,
    },
    notes: [
      'A blank device (its first 8 KiB are zero) is formatted. Anything else is refused unless',
      '--force is given; a pcache cache that still holds data not yet written back to its backing',
      'device is refused even then (drain it first with `pcache serve` + `pcache drain`), unless',
      '--discard-dirty is given too. A device that another process has open is always refused.',
    ],
  },
  serve: {
    summary: 'serve a backing device through its cache over NBD',
    usage: [
      'pcache serve --cache PATH --backing PATH|URI [--cache-size SIZE] [--socket PATH | --port N [--bind ADDR]]',
      '             [--control PATH] [--export-name NAME] [--read-only] [--gc-percent N] [--tuning NAME=VALUE,...]',
      '             [--backing-connections N] [--metrics HOST:PORT [--metrics-allow-remote]] [--log-level LEVEL]',
      '             [--drain-on-exit [--drain-timeout SECONDS]] [--force-backing] [--busy-poll-us N]',
      'pcache serve            (no arguments: a ready-made cache and disk in ./pcache-data/)',
    ],
    flags: {
      cache: { kind: 'string', value: 'PATH', help: 'the cache device (opened with synchronous I/O: put it on fast storage)' },
      backing: { kind: 'string', value: 'PATH|URI', help: 'the backing device: a file or block device (asynchronous I/O), or nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH' },
      'backing-connections': { kind: 'string', value: 'N', help: `with an NBD backing device: connections to it, 1..${connectionsMax} (default ${defaultConnections})` },
      'cache-size': { kind: 'string', value: 'SIZE', help: 'create a missing cache file of this size (sparse)' },
      'backing-size': { kind: 'string', value: 'SIZE', help: 'create a missing backing file of this size (sparse)' },
      socket: { kind: 'string', value: 'PATH', help: 'listen on this Unix socket (default ./nbd.sock)' },
      port: { kind: 'string', value: 'N', help: 'listen on TCP port N instead (0 picks a free port)' },
      bind: { kind: 'string', value: 'ADDR', help: 'with --port: the address to bind (default 127.0.0.1)' },
      control: { kind: 'string', value: 'PATH', help: 'also answer `pcache status`, `drain` and `set` on this Unix socket' },
      'export-name': { kind: 'string', value: 'NAME', help: 'the NBD export name (default "pcache"; the empty name works too)' },
      'read-only': { kind: 'boolean', help: 'refuse writes; nothing is written to either device' },
      'force-backing': { kind: 'boolean', help: 'open the cache although the backing device is not the one it was formatted for (a copy or a moved file of the same size)' },
      'gc-percent': { kind: 'string', value: 'N', help: `set the GC threshold (0..${gcPercentMax}) and store it in the cache` },
      tuning: { kind: 'string', value: 'NAME=VALUE,...', help: 'runtime knobs to start with (names as in `pcache set`, e.g. writeback_idle_ms=5000)' },
      metrics: { kind: 'string', value: 'HOST:PORT', help: 'serve Prometheus metrics at http://HOST:PORT/metrics (loopback only; port 0 picks one)' },
      'metrics-allow-remote': { kind: 'boolean', help: 'let --metrics bind an address that is not loopback (metrics have no authentication)' },
      'log-level': { kind: 'string', value: 'LEVEL', help: `JSON log lines on stderr at this level and above: ${logLevels.join(', ')} (default info)` },
      'drain-on-exit': { kind: 'boolean', help: 'on SIGINT/SIGTERM, write everything back before stopping' },
      'drain-timeout': { kind: 'string', value: 'SECONDS', help: `with --drain-on-exit: stop anyway after this long (default ${defaultDrainTimeoutSeconds})` },
      'no-cache': { kind: 'boolean', help: 'serve the backing device directly, without a cache (for comparisons)' },
      'busy-poll-us': { kind: 'string', value: 'N', help: `after answering a client at low queue depth, poll for its next request for up to N microseconds instead of sleeping, 0..${busyPollWindowMaxUs} (default ${busyPollWindowDefaultUs}; 0 turns it off)` },
      'record-dir': { kind: 'string', value: 'DIR', help: 'record every write and sync of both devices to DIR/cache.log and DIR/backing.log (for crash testing; see docs/testing.md)' },
      help: helpFlag,
    },
    notes: [
      'A blank cache device is formatted with the defaults (and --gc-percent). A device holding',
      'anything else that is not this backing device\'s cache is refused without writing a byte.',
      'SIGINT or SIGTERM stop the server cleanly: requests in flight finish, the cache log is',
      'made durable, and pcache exits with status 0. Dirty data stays in the cache for next time,',
      'unless --drain-on-exit writes it back first (a second signal stops waiting for that).',
      'Logs are JSON lines on stderr; nothing is logged per request at info level.',
    ],
  },
  status: {
    summary: "show a cache's state (dm-pcache's nine status fields and more)",
    usage: ['pcache status --control PATH [--json]', 'pcache status --cache PATH [--json]'],
    flags: {
      control: { kind: 'string', value: 'PATH', help: 'ask a running server through its control socket' },
      cache: { kind: 'string', value: 'PATH', help: 'read an idle cache device directly (read-only)' },
      json: { kind: 'boolean', help: 'print JSON instead of a table' },
      help: helpFlag,
    },
    notes: [
      '--cache reads the device without writing to it and refuses a device that another process',
      '(such as a running `pcache serve`) has open; ask that server with --control instead.',
    ],
  },
  check: {
    summary: 'check a cache device structurally, without writing to it',
    usage: ['pcache check --cache PATH [--json]'],
    flags: {
      cache: { kind: 'string', value: 'PATH', help: 'the cache device to check (required; must be idle)' },
      json: { kind: 'boolean', help: 'print JSON: problems, warnings and a summary' },
      help: helpFlag,
    },
    notes: ['Exits with status 1 if any problem is found, 0 if there are none (warnings allowed).'],
  },
  drain: {
    summary: 'write back all dirty data of a running server; returns once clean',
    usage: ['pcache drain --control PATH [--timeout SECONDS] [--progress]'],
    flags: {
      control: { kind: 'string', value: 'PATH', help: "the server's control socket (required)" },
      timeout: { kind: 'string', value: 'SECONDS', help: 'give up after this long (exit 1); default: wait until clean' },
      progress: { kind: 'boolean', help: 'show dirty bytes left, rate and time left on stderr while waiting' },
      help: helpFlag,
    },
    notes: [
      'Everything written before the drain started is on the backing device, synced, when it returns.',
      'Ctrl-C stops waiting (exit 130) and cancels nothing: the server finishes the drain it started.',
    ],
  },
  set: {
    summary: "change a running cache's gc_percent and writeback knobs, or list them",
    usage: ['pcache set --control PATH [NAME VALUE]...'],
    flags: {
      control: { kind: 'string', value: 'PATH', help: "the server's control socket (required)" },
      json: { kind: 'boolean', help: 'print the settings as JSON' },
      help: helpFlag,
    },
    positionals: true,
    notes: [
      'With no NAME VALUE pairs, lists every setting and its value. Settings (integers):',
      ...knobNames.map((name) => `  ${name}`),
      'gc_percent is stored in the cache; the others last until the server stops (see serve --tuning).',
      'All pairs of one command are checked first and applied together, or none is.',
    ],
  },
};

const commandNames = Object.keys(specs) as CommandName[];

export interface FormatArgs {
  readonly cachePath: string;
  /** A file or block device path, or an NBD URI when backingIsUri. */
  readonly backingPath: string;
  readonly backingIsUri: boolean;
  readonly cacheSizeBytes: number | undefined;
  readonly segmentSizeBytes: number | undefined;
  readonly dataCrc: boolean;
  readonly gcPercent: number | undefined;
  readonly force: boolean;
  readonly discardDirty: boolean;
}

export type ListenArgs = { readonly path: string } | { readonly port: number; readonly host: string };

export interface ServeArgs {
  /** The cache device; empty with --no-cache (nothing is cached then). */
  readonly cachePath: string;
  /** A file or block device path, or an NBD URI when backingIsUri. */
  readonly backingPath: string;
  readonly backingIsUri: boolean;
  /** Connections to an NBD backing device. */
  readonly backingConnections: number;
  readonly cacheSizeBytes: number | undefined;
  readonly backingSizeBytes: number | undefined;
  readonly listen: ListenArgs;
  readonly controlPath: string | undefined;
  readonly exportName: string;
  readonly readOnly: boolean;
  readonly gcPercent: number | undefined;
  readonly noCache: boolean;
  /** Record both devices' writes and syncs here (RecordingDevice), for offline power-loss states. */
  readonly recordDir: string | undefined;
  /** `pcache serve` with no arguments: create ./pcache-data/ and print connection recipes. */
  readonly defaultMode: boolean;
  /** Runtime knobs to apply at start (`--tuning`), by snake_case name. */
  readonly tuning: Readonly<Record<string, number>>;
  readonly metrics: MetricsArgs | undefined;
  readonly logLevel: LogLevel;
  readonly drainOnExit: boolean;
  readonly drainTimeoutMs: number;
  /** Accept a backing device whose identity differs from the recorded one (same size). */
  readonly forceBacking: boolean;
  /** The NBD server's busy-polling window (src/nbd/server/busy_poll.ts). */
  readonly busyPollUs: number;
}

export type StatusArgs = { readonly controlPath: string; readonly json: boolean } | { readonly cachePath: string; readonly json: boolean };

export interface CheckArgs {
  readonly cachePath: string;
  readonly json: boolean;
}

export interface DrainArgs {
  readonly controlPath: string;
  readonly timeoutMs: number | undefined;
  readonly progress: boolean;
}

export interface SetArgs {
  readonly controlPath: string;
  /** The changes, in the order given; empty to list the settings. */
  readonly changes: Readonly<Record<string, number>>;
  readonly json: boolean;
}


/** Where `serve --metrics` listens. */
export interface MetricsArgs {
  readonly host: string;
  readonly port: number;
}

export type Invocation =
  | { readonly command: 'help'; readonly text: string }
  | { readonly command: 'version' }
  | { readonly command: 'format'; readonly args: FormatArgs }
  | { readonly command: 'serve'; readonly args: ServeArgs }
  | { readonly command: 'status'; readonly args: StatusArgs }
  | { readonly command: 'check'; readonly args: CheckArgs }
  | { readonly command: 'drain'; readonly args: DrainArgs }
  | { readonly command: 'set'; readonly args: SetArgs };

/** The directory, files and sizes of `pcache serve` with no arguments. */
export const defaultServe = {
  directory: 'pcache-data',
  cacheFile: 'pcache-data/cache.img',
  cacheSizeBytes: 1 * GiB,
  backingFile: 'pcache-data/backing.img',
  backingSizeBytes: 8 * GiB,
  socket: 'pcache-data/nbd.sock',
  control: 'pcache-data/control.sock',
} as const;

const defaultSocket = 'nbd.sock';
const defaultExportName = 'pcache';
const portMax = 65_535;

export function parseCommandLine(argv: readonly string[]): Invocation {
  const [first, ...rest] = argv;
  if (first === undefined) throw new UsageError('no command given (see pcache --help)');
  if (first === '--help' || first === '-h') return { command: 'help', text: overviewHelp() };
  if (first === '--version' || first === '-V') return { command: 'version' };
  if (first === 'help') {
    const topic = rest[0];
    if (topic === undefined) return { command: 'help', text: overviewHelp() };
    return { command: 'help', text: commandHelp(commandNamed(topic)) };
  }
  const name = commandNamed(first);
  const flags = parseFlags(name, rest);
  if (flags.has('help')) return { command: 'help', text: commandHelp(name) };
  switch (name) {
    case 'format':
      return { command: 'format', args: formatArgs(flags) };
    case 'serve':
      return { command: 'serve', args: serveArgs(flags, rest.length === 0) };
    case 'status':
      return { command: 'status', args: statusArgs(flags) };
    case 'check':
      return { command: 'check', args: { cachePath: required(flags, 'check', 'cache'), json: flags.has('json') } };
    case 'drain':
      return { command: 'drain', args: drainArgs(flags) };
    case 'set':
      return { command: 'set', args: setArgs(flags) };
  }
}

function commandNamed(text: string): CommandName {
  const name = commandNames.find((candidate) => candidate === text);
  if (name === undefined) {
    const what = text.startsWith('-') ? `unknown option ${text}` : `unknown command '${text}'`;
    throw new UsageError(`${what} (commands: ${commandNames.join(', ')}; see pcache --help)`);
  }
  return name;
}

type Flags = Map<string, string | true> & { positionals?: string[] };

/** Parses `args` against `name`'s flag table; anything unknown, repeated or malformed is a UsageError. */
function parseFlags(name: CommandName, args: readonly string[]): Flags {
  const spec = specs[name];
  const options: Record<string, { type: 'string' | 'boolean'; short?: string }> = {};
  for (const [flag, flagSpec] of Object.entries(spec.flags)) options[flag] = { type: flagSpec.kind };
  options.help = { type: 'boolean', short: 'h' };
  // strict: false, so that every mistake is reported here, in one line, in our words.
  const { tokens } = parseArgs({ args: [...args], options, strict: false, allowPositionals: true, tokens: true });
  const flags: Flags = new Map();
  flags.positionals = [];
  const hint = `see pcache ${name} --help`;
  for (const token of tokens) {
    if (token.kind === 'option-terminator') continue;
    if (token.kind === 'positional') {
      if (spec.positionals !== true) throw new UsageError(`${name}: unexpected argument '${token.value}' (${hint})`);
      flags.positionals.push(token.value);
      continue;
    }
    const flagSpec = token.name === 'help' ? helpFlag : spec.flags[token.name];
    if (flagSpec === undefined) throw new UsageError(`${name}: unknown option ${token.rawName} (${hint})`);
    if (flags.has(token.name)) throw new UsageError(`${name}: ${token.rawName} given more than once`);
    if (flagSpec.kind === 'boolean') {
      if (token.value !== undefined) throw new UsageError(`${name}: ${token.rawName} takes no value`);
      flags.set(token.name, true);
      continue;
    }
    const value = token.value;
    // `--cache --backing x` would take "--backing" as the path: treat it as a missing value.
    if (value === undefined || (!token.inlineValue && value.startsWith('-'))) {
      throw new UsageError(`${name}: ${token.rawName} needs a value (${flagSpec.value ?? 'VALUE'})`);
    }
    if (value === '') throw new UsageError(`${name}: ${token.rawName} needs a non-empty value`);
    flags.set(token.name, value);
  }
  return flags;
}

function optional(flags: Flags, flag: string): string | undefined {
  const value = flags.get(flag);
  return typeof value === 'string' ? value : undefined;
}

function required(flags: Flags, command: CommandName, flag: string): string {
  const value = optional(flags, flag);
  if (value === undefined) throw new UsageError(`${command}: --${flag} is required (see pcache ${command} --help)`);
  return value;
}

function sizeFlag(flags: Flags, command: CommandName, flag: string): number | undefined {
  const text = optional(flags, flag);
  if (text === undefined) return undefined;
  let bytes: number;
  try {
    bytes = parseSize(text);
  } catch (error) {
    if (isPcacheError(error)) throw new UsageError(`${command}: --${flag}: ${error.message}`);
    throw error;
  }
  if (bytes <= 0) throw new UsageError(`${command}: --${flag} must be larger than zero`);
  return bytes;
}

function integerFlag(flags: Flags, command: CommandName, flag: string, range: { min: number; max: number }): number | undefined {
  const text = optional(flags, flag);
  if (text === undefined) return undefined;
  const value = /^\d+$/.test(text) ? Number(text) : Number.NaN;
  if (!Number.isSafeInteger(value) || value < range.min || value > range.max) {
    throw new UsageError(`${command}: --${flag} must be an integer from ${range.min} to ${range.max}, got '${text}'`);
  }
  return value;
}

function gcPercentFlag(flags: Flags, command: CommandName): number | undefined {
  return integerFlag(flags, command, 'gc-percent', { min: 0, max: gcPercentMax });
}

function formatArgs(flags: Flags): FormatArgs {
  const segmentSizeBytes = sizeFlag(flags, 'format', 'segment-size');
  if (segmentSizeBytes !== undefined) {
    const aligned = segmentSizeBytes % segmentSizeAlignBytes === 0;
    if (!aligned || segmentSizeBytes < segmentSizeMinBytes || segmentSizeBytes > segmentSizeMaxBytes) {
      throw new UsageError(`format: --segment-size must be a multiple of 1M from 1M to ${segmentSizeMaxBytes / GiB}G, got ${segmentSizeBytes} bytes`);
    }
  }
  if (flags.has('discard-dirty') && !flags.has('force')) throw new UsageError('format: --discard-dirty only goes with --force');
  const backingPath = required(flags, 'format', 'backing');
  return {
    cachePath: required(flags, 'format', 'cache'),
    backingPath,
    backingIsUri: backingIsUri('format', backingPath),
    cacheSizeBytes: sizeFlag(flags, 'format', 'cache-size'),
    segmentSizeBytes,
    dataCrc: flags.has('data-crc'),
    gcPercent: gcPercentFlag(flags, 'format'),
    force: flags.has('force'),
    discardDirty: flags.has('discard-dirty'),
  };
}

function serveArgs(flags: Flags, noArguments: boolean): ServeArgs {
  if (noArguments) {
    return {
      cachePath: defaultServe.cacheFile,
      backingPath: defaultServe.backingFile,
      backingIsUri: false,
      backingConnections: defaultConnections,
      cacheSizeBytes: defaultServe.cacheSizeBytes,
      backingSizeBytes: defaultServe.backingSizeBytes,
      listen: { path: defaultServe.socket },
      controlPath: defaultServe.control,
      exportName: defaultExportName,
      readOnly: false,
      gcPercent: undefined,
      noCache: false,
      recordDir: undefined,
      defaultMode: true,
      tuning: {},
      metrics: undefined,
      logLevel: 'info',
      drainOnExit: false,
      drainTimeoutMs: defaultDrainTimeoutSeconds * 1000,
      forceBacking: false,
      busyPollUs: busyPollWindowDefaultUs,
    };
  }
  const socket = optional(flags, 'socket');
  const port = integerFlag(flags, 'serve', 'port', { min: 0, max: portMax });
  const bind = optional(flags, 'bind');
  if (socket !== undefined && port !== undefined) throw new UsageError('serve: --socket and --port cannot be used together');
  if (bind !== undefined && port === undefined) throw new UsageError('serve: --bind needs --port');
  const noCache = flags.has('no-cache');
  const readOnly = flags.has('read-only');
  const gcPercent = gcPercentFlag(flags, 'serve');
  if (gcPercent !== undefined && readOnly) throw new UsageError('serve: --gc-percent cannot be stored in a cache served --read-only');
  if (noCache) {
    for (const flag of ['cache', 'cache-size', 'gc-percent', 'tuning', 'drain-on-exit', 'force-backing']) {
      if (flags.has(flag)) throw new UsageError(`serve: --${flag} makes no sense with --no-cache`);
    }
  }
  const backingPath = required(flags, 'serve', 'backing');
  const isUri = backingIsUri('serve', backingPath);
  if (isUri && flags.has('backing-size')) throw new UsageError('serve: --backing-size makes no sense with an NBD backing device (its server decides its size)');
  const connections = integerFlag(flags, 'serve', 'backing-connections', { min: 1, max: connectionsMax });
  if (connections !== undefined && !isUri) throw new UsageError('serve: --backing-connections needs an NBD URI for --backing');
  if (flags.has('drain-timeout') && !flags.has('drain-on-exit')) throw new UsageError('serve: --drain-timeout needs --drain-on-exit');
  if (flags.has('drain-on-exit') && readOnly) throw new UsageError('serve: --drain-on-exit makes no sense with --read-only (nothing can be dirty)');
  if (flags.has('metrics-allow-remote') && !flags.has('metrics')) throw new UsageError('serve: --metrics-allow-remote needs --metrics');
  const drainSeconds = integerFlag(flags, 'serve', 'drain-timeout', { min: 1, max: 365 * 24 * 3600 }) ?? defaultDrainTimeoutSeconds;
  return {
    cachePath: noCache ? '' : required(flags, 'serve', 'cache'),
    backingPath,
    backingIsUri: isUri,
    backingConnections: connections ?? defaultConnections,
    cacheSizeBytes: sizeFlag(flags, 'serve', 'cache-size'),
    backingSizeBytes: sizeFlag(flags, 'serve', 'backing-size'),
    listen: port !== undefined ? { port, host: bind ?? '127.0.0.1' } : { path: socket ?? defaultSocket },
    controlPath: optional(flags, 'control'),
    exportName: optional(flags, 'export-name') ?? defaultExportName,
    readOnly,
    gcPercent,
    noCache,
    recordDir: optional(flags, 'record-dir'),
    defaultMode: false,
    tuning: tuningFlag(flags),
    metrics: metricsFlag(flags),
    logLevel: logLevelFlag(flags),
    drainOnExit: flags.has('drain-on-exit'),
    drainTimeoutMs: drainSeconds * 1000,
    forceBacking: flags.has('force-backing'),
    busyPollUs: integerFlag(flags, 'serve', 'busy-poll-us', { min: 0, max: busyPollWindowMaxUs }) ?? busyPollWindowDefaultUs,
  };
}

/** Whether --backing names an NBD URI; a malformed one is a usage error saying what is wrong. */
function backingIsUri(command: CommandName, text: string): boolean {
  if (!looksLikeNbdUri(text)) return false;
  try {
    parseNbdUri(text);
  } catch (error) {
    if (isPcacheError(error)) throw new UsageError(`${command}: --backing: ${error.message}`);
    throw error;
  }
  return true;
}

/** `--tuning name=value,name=value`: every name known, every value an integer in range. */
function tuningFlag(flags: Flags): Record<string, number> {
  const text = optional(flags, 'tuning');
  const tuning: Record<string, number> = {};
  if (text === undefined) return tuning;
  for (const item of text.split(',')) {
    const equals = item.indexOf('=');
    if (equals <= 0) throw new UsageError(`serve: --tuning takes NAME=VALUE pairs separated by commas, got '${item}'`);
    const name = item.slice(0, equals);
    if (name === 'gc_percent') throw new UsageError('serve: --tuning: use --gc-percent for gc_percent (it is stored in the cache)');
    if (Object.hasOwn(tuning, name)) throw new UsageError(`serve: --tuning: ${name} given more than once`);
    tuning[name] = knobValue('serve: --tuning', name, item.slice(equals + 1));
  }
  // The cache would refuse this too, but only after creating (and formatting) its files.
  const start = tuning.writeback_start_percent;
  const stop = tuning.writeback_stop_percent;
  const problem = watermarkProblem(start ?? knobDefault('writeback_start_percent'), stop ?? knobDefault('writeback_stop_percent'));
  if (problem !== undefined) {
    const defaulted = start === undefined ? 'writeback_start_percent' : stop === undefined ? 'writeback_stop_percent' : undefined;
    throw new UsageError(`serve: --tuning: ${problem}${defaulted === undefined ? '' : ` (${defaulted} at its default; give both to move them past each other)`}`);
  }
  return tuning;
}

function knobDefault(name: string): number {
  const knob = knobNamed(name);
  if (knob === undefined) throw new Error(`no knob named ${name}`);
  return knob.defaultValue;
}

/** One knob's value from text; unknown names and bad values are usage errors. */
function knobValue(where: string, name: string, text: string): number {
  const knob = knobNamed(name);
  if (knob === undefined) throw new UsageError(`${where}: unknown setting '${name}' (settings: ${knobNames.join(', ')})`);
  const value = /^\d+$/.test(text) ? Number(text) : Number.NaN;
  const problem = knobValueProblem(knob, Number.isNaN(value) ? text : value);
  if (problem !== undefined) throw new UsageError(`${where}: ${problem}`);
  return value;
}

/** `--metrics HOST:PORT` (`[v6]:PORT` for IPv6); a host that is not loopback needs --metrics-allow-remote. */
function metricsFlag(flags: Flags): MetricsArgs | undefined {
  const text = optional(flags, 'metrics');
  if (text === undefined) return undefined;
  const match = /^(?:\[([^\]]+)\]|([^:[\]]+)):(\d{1,5})$/.exec(text);
  const host = match?.[1] ?? match?.[2];
  const port = Number(match?.[3]);
  if (match === null || host === undefined || !(port >= 0 && port <= portMax)) {
    throw new UsageError(`serve: --metrics takes HOST:PORT (e.g. 127.0.0.1:9187, [::1]:9187; port 0 picks one), got '${text}'`);
  }
  if (!isLoopback(host) && !flags.has('metrics-allow-remote')) {
    throw new UsageError(`serve: --metrics ${text}: ${host} is not a loopback address and metrics have no authentication; ` +
      'add --metrics-allow-remote to serve them there anyway');
  }
  return { host, port };
}

/** Loopback: localhost, 127.0.0.0/8, ::1 (and ::ffff:127.x.y.z). Any other name might resolve anywhere. */
export function isLoopback(host: string): boolean {
  if (host === 'localhost') return true;
  if (net.isIPv4(host)) return host.startsWith('127.');
  if (!net.isIPv6(host)) return false;
  const mapped = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/i.exec(host)?.[1];
  if (mapped !== undefined) return mapped.startsWith('127.');
  // The URL parser writes an IPv6 address in its shortest form, so every spelling of ::1 meets.
  return new URL(`http://[${host}]/`).hostname === '[::1]';
}

function logLevelFlag(flags: Flags): LogLevel {
  const text = optional(flags, 'log-level');
  if (text === undefined) return 'info';
  const level = logLevels.find((candidate) => candidate === text);
  if (level === undefined) throw new UsageError(`serve: --log-level must be one of ${logLevels.join(', ')}, got '${text}'`);
  return level;
}

function statusArgs(flags: Flags): StatusArgs {
  const control = optional(flags, 'control');
  const cache = optional(flags, 'cache');
  const json = flags.has('json');
  if (control !== undefined && cache !== undefined) throw new UsageError('status: give either --control or --cache, not both');
  if (control !== undefined) return { controlPath: control, json };
  if (cache !== undefined) return { cachePath: cache, json };
  throw new UsageError('status: --control or --cache is required (see pcache status --help)');
}

function drainArgs(flags: Flags): DrainArgs {
  const seconds = integerFlag(flags, 'drain', 'timeout', { min: 1, max: 365 * 24 * 3600 });
  return { controlPath: required(flags, 'drain', 'control'), timeoutMs: seconds === undefined ? undefined : seconds * 1000, progress: flags.has('progress') };
}

function setArgs(flags: Flags): SetArgs {
  const controlPath = required(flags, 'set', 'control');
  const words = flags.positionals ?? [];
  if (words.length % 2 !== 0) {
    throw new UsageError(`set: '${words[words.length - 1] ?? ''}' needs a value: give NAME VALUE pairs (see pcache set --help)`);
  }
  const changes: Record<string, number> = {};
  for (let index = 0; index < words.length; index += 2) {
    const name = words[index] ?? '';
    if (Object.hasOwn(changes, name)) throw new UsageError(`set: ${name} given more than once`);
    changes[name] = knobValue('set', name, words[index + 1] ?? '');
  }
  return { controlPath, changes, json: flags.has('json') };
}

function overviewHelp(): string {
  const lines = [
    'pcache: a persistent, crash-safe write-back cache for block devices, served over NBD',
    '',
    'Usage: pcache <command> [options]',
    '',
    'Commands:',
    ...commandNames.map((name) => `  ${name.padEnd(8)} ${specs[name].summary}`),
    '',
    'Run `pcache <command> --help` for a command\'s options; `pcache --version` for the version.',
    `Exit status: ${exitOk} success, ${exitFailure} the operation failed or was refused (or check found problems),`,
    `${exitUsage} a mistake in the command line, ${exitInternal} an internal error (a bug; please report it),`,
    `${exitInterrupted} drain stopped waiting on Ctrl-C (the server goes on with the drain).`,
    `Sizes take the suffixes K, M, G and T (binary: 1M = ${MiB} bytes).`,
  ];
  return lines.join('\n');
}

function commandHelp(name: CommandName): string {
  const spec = specs[name];
  const rows = Object.entries(spec.flags).map(([flag, flagSpec]) => {
    const shown = flag === 'help' ? '-h, --help' : `--${flag}${flagSpec.value === undefined ? '' : ` ${flagSpec.value}`}`;
    return `  ${shown.padEnd(24)} ${flagSpec.help}`;
  });
  return [`pcache ${name}: ${spec.summary}`, '', 'Usage:', ...spec.usage.map((line) => `  ${line}`), '', 'Options:', ...rows, '', ...spec.notes].join('\n');
}
