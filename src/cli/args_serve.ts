// The grammar of `pcache serve`: its flag table and help, its typed options, the no-argument
// default (./pcache-data/), and the rules between its flags (--socket or --port, what makes no
// sense with --no-cache or --read-only, --tuning's settings, --metrics' loopback rule, TLS's
// flags and the rule that a non-loopback --bind needs --tls require or --allow-insecure).

import net from 'node:net';
import { GiB } from '../lib/units.js';
import { connectionsMax, defaultConnections } from '../nbd/client/remote_device.js';
import { busyPollWindowDefaultUs, busyPollWindowMaxUs } from '../nbd/server/busy_poll.js';
import { gcPercentMax } from '../ondisk/layout.js';
import { knobNamed, watermarkProblem, type KnobValue } from './settings.js';
import { secondsRange, switchFlag, valueFlag, type CommandGrammar, type Flags } from './args_parse.js';
import { backingIsUri, gcPercentFlag, knobValue, modeFlagValue, segmentSizeFlag } from './args_commands.js';
import { cacheModes, type CacheMode } from '../ondisk/cache_info.js';

export const logLevels = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'] as const;
export type LogLevel = (typeof logLevels)[number];

export type ListenArgs = { readonly path: string } | { readonly port: number; readonly host: string };

/** TLS as `serve --tls`, `--tls-certificates`, `--tls-psk` and `--tls-verify-peer` ask for it (nbdkit's meanings). */
export interface TlsArgs {
  /** 'on': clients may upgrade to TLS; 'require': they must, before anything else. */
  readonly mode: 'on' | 'require';
  /** --tls-certificates DIR: ca-cert.pem, server-cert.pem, server-key.pem (ca-crl.pem optional). */
  readonly certificatesDir: string | undefined;
  /** --tls-psk FILE: psktool's username:hexkey lines. */
  readonly pskFile: string | undefined;
  /** --tls-verify-peer: clients must present a certificate signed by the CA. */
  readonly verifyPeer: boolean;
}

/** Where `serve --metrics` listens. */
export interface MetricsArgs {
  readonly host: string;
  readonly port: number;
}

export interface ServeArgs {
  /** The cache device; empty with --no-cache (nothing is cached then). */
  readonly cachePath: string;
  /** A file or block device path, or an NBD URI when backingIsUri. */
  readonly backingPath: string;
  readonly backingIsUri: boolean;
  /** Connections to an NBD backing device. */
  readonly backingConnections: number;
  readonly cacheSizeBytes: number | undefined;
  /** Bytes per segment when `serve` formats a blank cache device. */
  readonly segmentSizeBytes: number | undefined;
  readonly backingSizeBytes: number | undefined;
  readonly listen: ListenArgs;
  /** --socket or --port was given (the default socket is not used under systemd socket activation). */
  readonly listenGiven: boolean;
  readonly controlPath: string | undefined;
  readonly exportName: string;
  readonly readOnly: boolean;
  readonly gcPercent: number | undefined;
  /** `--mode`: the write mode to serve in (stored in the cache); undefined keeps the stored one. */
  readonly mode: CacheMode | undefined;
  readonly noCache: boolean;
  /**
   * No --backing: serve every volume recorded on the cache device (a blank one is formatted
   * for volumes, with none); `pcache volume add` adds more. backingPath is empty then.
   */
  readonly volumes: boolean;
  /**
   * `--volume-processes on|off` (volumes only; default on): each volume served by a process of
   * its own (cli/volume_processes.ts), or all of them in the serve process (cli/volume_set.ts).
   */
  readonly volumeProcesses: boolean;
  /** Record both devices' writes and syncs here (RecordingDevice), for offline power-loss states. */
  readonly recordDir: string | undefined;
  /** `pcache serve` with no arguments: create ./pcache-data/ and print connection recipes. */
  readonly defaultMode: boolean;
  /** Runtime knobs to apply at start (`--tuning`), by snake_case name. */
  readonly tuning: Readonly<Record<string, KnobValue>>;
  readonly metrics: MetricsArgs | undefined;
  readonly logLevel: LogLevel;
  readonly drainOnExit: boolean;
  readonly drainTimeoutMs: number;
  /** Accept a backing device whose identity differs from the recorded one (same size). */
  readonly forceBacking: boolean;
  /** Serve a cache whose log is damaged, losing every write from the damage on. */
  readonly acceptLogLoss: boolean;
  /** Serve although the backing device changed while dirty data waited for it. */
  readonly acceptBackingChange: boolean;
  /** The NBD server's busy-polling window (src/nbd/busy_poll.ts). */
  readonly busyPollUs: number;
  /** TLS for NBD clients; undefined: none (NOTLS). */
  readonly tls: TlsArgs | undefined;
  /** Serve a network address without required TLS anyway (--allow-insecure). */
  readonly allowInsecure: boolean;
  /** Write the server's PID here once it listens; removed when it stops. */
  readonly pidFile: string | undefined;
}

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

/** How long `serve --drain-on-exit` waits for the drain before stopping anyway. */
const defaultDrainTimeoutSeconds = 300;
const defaultSocket = 'nbd.sock';
const defaultExportName = 'pcache';
const portRange = { min: 0, max: 65_535 };

export const serveGrammar: CommandGrammar<ServeArgs> = {
  spec: {
    summary: 'serve a backing device through its cache over NBD',
    usage: [
      'pcache serve --cache PATH --backing PATH|URI [--cache-size SIZE [--segment-size SIZE]] [--socket PATH | --port N [--bind ADDR]]',
      '             [--tls off|on|require] [--tls-certificates DIR [--tls-verify-peer] | --tls-psk FILE] [--allow-insecure]',
      '             [--control PATH] [--export-name NAME] [--read-only] [--gc-percent N] [--mode MODE] [--tuning NAME=VALUE,...]',
      '             [--backing-connections N] [--metrics HOST:PORT [--metrics-allow-remote]] [--log-level LEVEL]',
      '             [--drain-on-exit [--drain-timeout SECONDS]] [--force-backing] [--accept-log-loss] [--accept-backing-change] [--busy-poll-us N] [--pid-file PATH]',
      'pcache serve --cache PATH [--cache-size SIZE [--segment-size SIZE]] (--socket PATH | --port N) --control PATH [...]',
      '                        (no --backing: serve the cache device\'s volumes; see `pcache volume`)',
      'pcache serve            (no arguments: a ready-made cache and disk in ./pcache-data/)',
    ],
    flags: {
      cache: valueFlag('PATH', 'the cache device (opened with synchronous I/O: put it on fast storage)'),
      backing: valueFlag('PATH|URI', 'the backing device: a file or block device (asynchronous I/O), or nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH (nbds://, nbds+unix:// over TLS, with tls-certificates= or tls-psk-file=)'),
      'backing-connections': valueFlag('N', `with an NBD backing device: connections to it, 1..${connectionsMax} (default ${defaultConnections})`),
      'cache-size': valueFlag('SIZE', 'create a missing cache file of this size (sparse)'),
      'segment-size': valueFlag('SIZE', 'bytes per segment when formatting a blank cache device, a multiple of 1M from 1M to 1G (default: the cache size / 256 rounded down to a power of two, 1M to 16M)'),
      'backing-size': valueFlag('SIZE', 'create a missing backing file of this size (sparse)'),
      socket: valueFlag('PATH', 'listen on this Unix socket (default ./nbd.sock)'),
      port: valueFlag('N', 'listen on TCP port N instead (0 picks a free port)'),
      bind: valueFlag('ADDR', 'with --port: the address to bind (default 127.0.0.1; an address that is not loopback needs --tls require, or --allow-insecure)'),
      tls: valueFlag('off|on|require', 'NBD over TLS: off (default without credentials), on (clients may upgrade; default with credentials), require (clients must, before anything else)'),
      'tls-certificates': valueFlag('DIR', 'X.509 credentials: DIR holds ca-cert.pem, server-cert.pem, server-key.pem and optionally ca-crl.pem (as nbdkit and qemu-nbd)'),
      'tls-psk': valueFlag('FILE', 'pre-shared keys instead: FILE holds username:hexkey lines (psktool -u NAME -p FILE writes one)'),
      'tls-verify-peer': switchFlag('with --tls-certificates: clients must present a certificate signed by the CA (and not in ca-crl.pem)'),
      'allow-insecure': switchFlag('serve a --bind address that is not loopback without --tls require (anyone who reaches it can read and write the disk)'),
      'pid-file': valueFlag('PATH', 'write the server\'s PID to PATH once it listens (removed when it stops)'),
      control: valueFlag('PATH', 'also answer `pcache status`, `drain` and `set` on this Unix socket (HTTP/JSON; curl --unix-socket PATH http://localhost/status works too)'),
      'export-name': valueFlag('NAME', 'the NBD export name (default "pcache"; the empty name works too)'),
      'read-only': switchFlag('refuse writes; nothing is written to either device'),
      'force-backing': switchFlag('open the cache although the backing device is not the one it was formatted for (a copy or a moved file of the same size)'),
      'accept-log-loss': switchFlag('serve a cache whose log is damaged, losing every write from the damaged kset on (see `pcache check`)'),
      'accept-backing-change': switchFlag('serve although the backing device changed since the last clean stop while the cache held dirty data for it: the dirty data is written back over it'),
      'gc-percent': valueFlag('N', `set the GC threshold (0..${gcPercentMax}) and store it in the cache`),
      mode: valueFlag('MODE', `the write mode: ${cacheModes.join(', ')} (default: the one stored in the cache; writeback for a new one); stored in the cache`),
      tuning: valueFlag('NAME=VALUE,...', 'runtime knobs to start with (names as in `pcache set`, e.g. writeback_idle_ms=5000)'),
      metrics: valueFlag('HOST:PORT', 'serve Prometheus metrics at http://HOST:PORT/metrics (loopback only; port 0 picks one)'),
      'metrics-allow-remote': switchFlag('let --metrics bind an address that is not loopback (metrics have no authentication)'),
      'log-level': valueFlag('LEVEL', `JSON log lines on stderr at this level and above: ${logLevels.join(', ')} (default info)`),
      'drain-on-exit': switchFlag('on SIGINT/SIGTERM, write everything back before stopping'),
      'drain-timeout': valueFlag('SECONDS', `with --drain-on-exit: stop anyway after this long (default ${defaultDrainTimeoutSeconds})`),
      'no-cache': switchFlag('serve the backing device directly, without a cache (for comparisons)'),
      'busy-poll-us': valueFlag('N', `after answering a client at low queue depth, poll for its next request for up to N microseconds instead of sleeping, 0..${busyPollWindowMaxUs} (default ${busyPollWindowDefaultUs}; 0 turns it off)`),
      'volume-processes': valueFlag('on|off', 'without --backing: serve each volume in a process of its own, so one volume\'s work never holds up another\'s (on, the default), or all volumes in the serve process (off)'),
      'record-dir': valueFlag('DIR', 'record every write and sync of both devices to DIR/cache.log and DIR/backing.log (for crash testing; see docs/testing.md)'),
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
  options: (flags) => (flags.empty ? defaultModeArgs() : serveArgs(flags)),
};

/** `pcache serve` with no arguments. */
function defaultModeArgs(): ServeArgs {
  return {
    cachePath: defaultServe.cacheFile,
    backingPath: defaultServe.backingFile,
    backingIsUri: false,
    backingConnections: defaultConnections,
    cacheSizeBytes: defaultServe.cacheSizeBytes,
    segmentSizeBytes: undefined,
    backingSizeBytes: defaultServe.backingSizeBytes,
    listen: { path: defaultServe.socket },
    controlPath: defaultServe.control,
    exportName: defaultExportName,
    readOnly: false,
    gcPercent: undefined,
    mode: undefined,
    noCache: false,
    volumes: false,
    volumeProcesses: false,
    recordDir: undefined,
    defaultMode: true,
    tuning: {},
    metrics: undefined,
    logLevel: 'info',
    drainOnExit: false,
    drainTimeoutMs: defaultDrainTimeoutSeconds * 1000,
    forceBacking: false,
    acceptLogLoss: false,
    acceptBackingChange: false,
    busyPollUs: busyPollWindowDefaultUs,
    listenGiven: false,
    tls: undefined,
    allowInsecure: false,
    pidFile: undefined,
  };
}

function serveArgs(flags: Flags): ServeArgs {
  const socket = flags.optional('socket');
  const port = flags.integer('port', portRange);
  const bind = flags.optional('bind');
  if (socket !== undefined && port !== undefined) throw flags.usage('--socket and --port cannot be used together');
  if (bind !== undefined && port === undefined) throw flags.usage('--bind needs --port');
  const noCache = flags.has('no-cache');
  const readOnly = flags.has('read-only');
  const gcPercent = gcPercentFlag(flags);
  if (gcPercent !== undefined && readOnly) throw flags.usage('--gc-percent cannot be stored in a cache served --read-only');
  const modeText = flags.optional('mode');
  const mode = modeText === undefined ? undefined : modeFlagValue(flags, modeText);
  if (mode !== undefined && readOnly) throw flags.usage('--mode cannot be stored in a cache served --read-only');
  if (noCache) {
    for (const flag of ['cache', 'cache-size', 'segment-size', 'gc-percent', 'mode', 'tuning', 'drain-on-exit', 'force-backing', 'accept-log-loss', 'accept-backing-change']) {
      if (flags.has(flag)) throw flags.usage(`--${flag} makes no sense with --no-cache`);
    }
  }
  const volumes = !flags.has('backing') && !noCache;
  if (volumes) {
    for (const flag of ['backing-size', 'backing-connections', 'export-name', 'gc-percent', 'mode', 'read-only', 'force-backing', 'accept-backing-change', 'accept-log-loss', 'record-dir']) {
      if (flags.has(flag)) throw flags.usage(`--${flag} needs --backing (without it, serve serves the cache device's volumes; set such things per volume: pcache volume add, pcache set --volume)`);
    }
    if (!flags.has('control')) throw flags.usage('--backing is required (or, to serve the cache device\'s volumes, --control PATH without --backing: volumes are added through it with pcache volume add)');
  }
  if (!volumes && flags.has('volume-processes')) throw flags.usage('--volume-processes is for serving a cache device\'s volumes (serve without --backing)');
  const processesText = flags.optional('volume-processes');
  if (processesText !== undefined && processesText !== 'on' && processesText !== 'off') throw flags.usage(`--volume-processes must be on or off, not "${processesText}"`);
  const backingPath = volumes ? '' : flags.required('backing');
  const isUri = !volumes && backingIsUri(flags, backingPath);
  if (isUri && flags.has('backing-size')) throw flags.usage('--backing-size makes no sense with an NBD backing device (its server decides its size)');
  const connections = flags.integer('backing-connections', { min: 1, max: connectionsMax });
  if (connections !== undefined && !isUri) throw flags.usage('--backing-connections needs an NBD URI for --backing');
  if (flags.has('drain-timeout') && !flags.has('drain-on-exit')) throw flags.usage('--drain-timeout needs --drain-on-exit');
  if (flags.has('drain-on-exit') && readOnly) throw flags.usage('--drain-on-exit makes no sense with --read-only (nothing can be dirty)');
  if (flags.has('metrics-allow-remote') && !flags.has('metrics')) throw flags.usage('--metrics-allow-remote needs --metrics');
  const drainSeconds = flags.integer('drain-timeout', secondsRange) ?? defaultDrainTimeoutSeconds;
  const tls = tlsFlags(flags);
  const allowInsecure = flags.has('allow-insecure');
  if (port !== undefined) refuseInsecureBind(flags, bind ?? '127.0.0.1', port, tls, allowInsecure);
  return {
    cachePath: noCache ? '' : flags.required('cache'),
    backingPath,
    backingIsUri: isUri,
    backingConnections: connections ?? defaultConnections,
    cacheSizeBytes: flags.size('cache-size'),
    segmentSizeBytes: segmentSizeFlag(flags),
    backingSizeBytes: flags.size('backing-size'),
    listen: port !== undefined ? { port, host: bind ?? '127.0.0.1' } : { path: socket ?? defaultSocket },
    controlPath: flags.optional('control'),
    exportName: flags.optional('export-name') ?? defaultExportName,
    readOnly,
    gcPercent,
    mode,
    noCache,
    volumes,
    volumeProcesses: processesText !== 'off',
    recordDir: flags.optional('record-dir'),
    defaultMode: false,
    tuning: tuningFlag(flags),
    metrics: metricsFlag(flags),
    logLevel: logLevelFlag(flags),
    drainOnExit: flags.has('drain-on-exit'),
    drainTimeoutMs: drainSeconds * 1000,
    forceBacking: flags.has('force-backing'),
    acceptLogLoss: flags.has('accept-log-loss'),
    acceptBackingChange: flags.has('accept-backing-change'),
    busyPollUs: flags.integer('busy-poll-us', { min: 0, max: busyPollWindowMaxUs }) ?? busyPollWindowDefaultUs,
    listenGiven: socket !== undefined || port !== undefined,
    tls,
    allowInsecure,
    pidFile: flags.optional('pid-file'),
  };
}

const tlsModes = ['off', 'on', 'require'] as const;

/** --tls and its credentials, with nbdkit's defaults: credentials alone mean --tls on. */
function tlsFlags(flags: Flags): TlsArgs | undefined {
  const text = flags.optional('tls');
  const mode = text === undefined ? undefined : tlsModes.find((candidate) => candidate === text);
  if (text !== undefined && mode === undefined) throw flags.usage(`--tls must be off, on or require, got '${text}'`);
  const certificatesDir = flags.optional('tls-certificates');
  const pskFile = flags.optional('tls-psk');
  const verifyPeer = flags.has('tls-verify-peer');
  if (certificatesDir !== undefined && pskFile !== undefined) {
    throw flags.usage('--tls-certificates and --tls-psk cannot be used together: serve with certificates or with pre-shared keys');
  }
  if (verifyPeer && certificatesDir === undefined) {
    throw flags.usage('--tls-verify-peer needs --tls-certificates (it checks client certificates against ca-cert.pem; with --tls-psk the key already proves who the client is)');
  }
  const credentials = certificatesDir !== undefined || pskFile !== undefined;
  if (mode === 'off') {
    if (credentials || verifyPeer) throw flags.usage(`--${certificatesDir !== undefined ? 'tls-certificates' : pskFile !== undefined ? 'tls-psk' : 'tls-verify-peer'} makes no sense with --tls off`);
    return undefined;
  }
  if (!credentials) {
    if (mode === undefined) return undefined;
    throw flags.usage(`--tls ${mode} needs credentials: --tls-certificates DIR (with ca-cert.pem, server-cert.pem and server-key.pem) or --tls-psk FILE (psktool's username:hexkey lines)`);
  }
  return { mode: mode ?? 'on', certificatesDir, pskFile, verifyPeer };
}

/**
 * An NBD export on a network address is a disk anyone who reaches it can read and write: that
 * takes --tls require (--tls on still lets a client in without TLS), or --allow-insecure.
 * Loopback is this machine's users only, like a Unix socket. The --metrics rule, for NBD.
 */
function refuseInsecureBind(flags: Flags, host: string, port: number, tls: TlsArgs | undefined, allowInsecure: boolean): void {
  const problem = insecureBindProblem(host, port, tls?.mode, allowInsecure);
  if (problem !== undefined) throw flags.usage(problem);
}

/** Why serving NBD at host:port is refused, or undefined when it is not (also used for an inherited socket). */
export function insecureBindProblem(host: string, port: number, mode: TlsArgs['mode'] | undefined, allowInsecure: boolean): string | undefined {
  if (isLoopback(host) || mode === 'require' || allowInsecure) return undefined;
  const how = mode === 'on' ? 'with TLS optional (--tls on lets a client in without TLS)' : 'without TLS';
  return `${host}:${port} is not a loopback address, and serving it ${how} lets anyone who can reach it read and write the disk: ` +
    'add --tls require with --tls-certificates DIR or --tls-psk FILE, or --allow-insecure to serve it anyway';
}

/** `--tuning name=value,name=value`: every name known, every value an integer in range. */
function tuningFlag(flags: Flags): Record<string, KnobValue> {
  const text = flags.optional('tuning');
  const tuning: Record<string, KnobValue> = {};
  if (text === undefined) return tuning;
  for (const item of text.split(',')) {
    const equals = item.indexOf('=');
    if (equals <= 0) throw flags.usage(`--tuning takes NAME=VALUE pairs separated by commas, got '${item}'`);
    const name = item.slice(0, equals);
    if (name === 'gc_percent') throw flags.usage('--tuning: use --gc-percent for gc_percent (it is stored in the cache)');
    if (name === 'mode') throw flags.usage('--tuning: use --mode for the write mode (it is stored in the cache)');
    if (Object.hasOwn(tuning, name)) throw flags.usage(`--tuning: ${name} given more than once`);
    tuning[name] = knobValue(flags, '--tuning: ', name, item.slice(equals + 1));
  }
  // The cache would refuse this too, but only after creating (and formatting) its files.
  const start = tuning.writeback_start_percent as number | undefined;
  const stop = tuning.writeback_stop_percent as number | undefined;
  const problem = watermarkProblem(start ?? knobDefault('writeback_start_percent'), stop ?? knobDefault('writeback_stop_percent'));
  if (problem !== undefined) {
    const defaulted = start === undefined ? 'writeback_start_percent' : stop === undefined ? 'writeback_stop_percent' : undefined;
    throw flags.usage(`--tuning: ${problem}${defaulted === undefined ? '' : ` (${defaulted} at its default; give both to move them past each other)`}`);
  }
  return tuning;
}

function knobDefault(name: string): number {
  const knob = knobNamed(name);
  if (knob === undefined || typeof knob.defaultValue !== 'number') throw new Error(`no numeric knob named ${name}`);
  return knob.defaultValue;
}

/** `--metrics HOST:PORT` (`[v6]:PORT` for IPv6); a host that is not loopback needs --metrics-allow-remote. */
function metricsFlag(flags: Flags): MetricsArgs | undefined {
  const text = flags.optional('metrics');
  if (text === undefined) return undefined;
  const match = /^(?:\[([^\]]+)\]|([^:[\]]+)):(\d{1,5})$/.exec(text);
  const host = match?.[1] ?? match?.[2];
  const port = Number(match?.[3]);
  if (match === null || host === undefined || !(port >= portRange.min && port <= portRange.max)) {
    throw flags.usage(`--metrics takes HOST:PORT (e.g. 127.0.0.1:9187, [::1]:9187; port 0 picks one), got '${text}'`);
  }
  if (!isLoopback(host) && !flags.has('metrics-allow-remote')) {
    throw flags.usage(`--metrics ${text}: ${host} is not a loopback address and metrics have no authentication; ` +
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
  const text = flags.optional('log-level');
  if (text === undefined) return 'info';
  const level = logLevels.find((candidate) => candidate === text);
  if (level === undefined) throw flags.usage(`--log-level must be one of ${logLevels.join(', ')}, got '${text}'`);
  return level;
}
