// The grammar of `format`, `status`, `check`, `drain` and `set`: each command's flag table and
// help, its typed options, and the rules that check them (args_serve.ts has `serve`'s). The
// value rules that several commands share live here too: an NBD URI for --backing,
// --gc-percent, and a setting's NAME and VALUE (`set`, `serve --tuning`).

import { looksLikeNbdUri, parseNbdUri } from '../nbd/client/uri.js';
import { GiB } from '../lib/units.js';
import { gcPercentMax, segmentSizeAlignBytes, segmentSizeMaxBytes, segmentSizeMinBytes } from '../ondisk/layout.js';
import { knobNamed, knobNames, knobValueProblem, modeSettingName, modeValue, type KnobValue } from './settings.js';
import { cacheModes, type CacheMode } from '../ondisk/cache_info.js';
import { decimalInteger, secondsRange, switchFlag, valueFlag, type CommandGrammar, type Flags } from './args_parse.js';

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

export type StatusArgs = { readonly controlPath: string; readonly json: boolean } | { readonly cachePath: string; readonly json: boolean };

export interface CheckArgs {
  readonly cachePath: string;
  readonly json: boolean;
  /** Rewrite damaged metadata copies from their valid twins before checking. */
  readonly repair: boolean;
}

/** `--volume NAME`: the volume a command is for, on a server of volumes. */
interface VolumeChoice {
  readonly volume: string | undefined;
}

export interface DrainArgs extends VolumeChoice {
  readonly controlPath: string;
  readonly timeoutMs: number | undefined;
  readonly progress: boolean;
}

/** `invalidate` and `detach`: a running server's control socket. */
export interface ControlArgs extends VolumeChoice {
  readonly controlPath: string;
  readonly json: boolean;
}

export interface CheckpointArgs extends VolumeChoice {
  readonly controlPath: string;
  /** A shell command run while the backing device is held ({name}, {time}, {epoch} substituted). */
  readonly exec: string | undefined;
  /** The checkpoint's name; undefined: pcache-<UTC time>. */
  readonly name: string | undefined;
  readonly timeoutMs: number | undefined;
  readonly json: boolean;
}

export interface SetArgs extends VolumeChoice {
  readonly controlPath: string;
  /** The changes, in the order given; empty to list the settings. */
  readonly changes: Readonly<Record<string, KnobValue>>;
  readonly json: boolean;
}

/** `--control PATH` of the commands that only talk to a running server. */
const serverControlFlag = valueFlag('PATH', "the server's control socket (required)");
/** `--volume NAME` of the commands that act on one cache. */
const volumeFlag = valueFlag('NAME', 'on a server of volumes (serve without --backing): the volume (required when it has several)');

export const formatGrammar: CommandGrammar<FormatArgs> = {
  spec: {
    summary: 'format a cache device for a backing device',
    usage: ['pcache format --cache PATH --backing PATH|URI [--segment-size SIZE] [--data-crc] [--gc-percent N] [--force [--discard-dirty]]'],
    flags: {
      cache: valueFlag('PATH', 'the cache device: a file or a block device (required)'),
      backing: valueFlag('PATH|URI', 'the backing device it will cache: a file, a block device or an NBD URI (required)'),
      'cache-size': valueFlag('SIZE', 'create the cache file with this size (sparse) if it does not exist'),
      'segment-size': valueFlag('SIZE', 'bytes per segment, a multiple of 1M from 1M to 1G (default: the cache size / 256 rounded down to a power of two, 1M to 16M)'),
      'data-crc': switchFlag('protect every cached extent with a CRC32C (fixed at format)'),
      'gc-percent': valueFlag('N', `start garbage collection when N% of segments are in use, 0..${gcPercentMax} (default 70)`),
      force: switchFlag('overwrite a device that is not blank (never discards dirty data on its own)'),
      'discard-dirty': switchFlag('with --force: also overwrite a cache that still holds dirty data, losing it'),
    },
    notes: [
      'A blank device (its first 8 KiB are zero) is formatted. Anything else is refused unless',
      '--force is given; a pcache cache that still holds data not yet written back to its backing',
      'device is refused even then (drain it first with `pcache serve` + `pcache drain`), unless',
      '--discard-dirty is given too. A device that another process has open is always refused.',
    ],
  },
  options(flags) {
    const segmentSizeBytes = segmentSizeFlag(flags);
    if (flags.has('discard-dirty') && !flags.has('force')) throw flags.usage('--discard-dirty only goes with --force');
    const backingPath = flags.required('backing');
    return {
      cachePath: flags.required('cache'),
      backingPath,
      backingIsUri: backingIsUri(flags, backingPath),
      cacheSizeBytes: flags.size('cache-size'),
      segmentSizeBytes,
      dataCrc: flags.has('data-crc'),
      gcPercent: gcPercentFlag(flags),
      force: flags.has('force'),
      discardDirty: flags.has('discard-dirty'),
    };
  },
};

/** `--segment-size SIZE` of format and serve: a multiple of 1M from 1M to 1G. */
export function segmentSizeFlag(flags: Flags): number | undefined {
  const segmentSizeBytes = flags.size('segment-size');
  if (segmentSizeBytes === undefined) return undefined;
  const aligned = segmentSizeBytes % segmentSizeAlignBytes === 0;
  if (!aligned || segmentSizeBytes < segmentSizeMinBytes || segmentSizeBytes > segmentSizeMaxBytes) {
    throw flags.usage(`--segment-size must be a multiple of 1M from 1M to ${segmentSizeMaxBytes / GiB}G, got ${segmentSizeBytes} bytes`);
  }
  return segmentSizeBytes;
}

export const statusGrammar: CommandGrammar<StatusArgs> = {
  spec: {
    summary: "show a cache's state (dm-pcache's nine status fields and more)",
    usage: ['pcache status --control PATH [--json]', 'pcache status --cache PATH [--json]'],
    flags: {
      control: valueFlag('PATH', 'ask a running server through its control socket'),
      cache: valueFlag('PATH', 'read an idle cache device directly (read-only)'),
      json: switchFlag('print JSON instead of a table'),
    },
    notes: [
      '--cache reads the device without writing to it and refuses a device that another process',
      '(such as a running `pcache serve`) has open; ask that server with --control instead.',
    ],
  },
  options(flags) {
    const control = flags.optional('control');
    const cache = flags.optional('cache');
    const json = flags.has('json');
    if (control !== undefined && cache !== undefined) throw flags.usage('give either --control or --cache, not both');
    if (control !== undefined) return { controlPath: control, json };
    if (cache !== undefined) return { cachePath: cache, json };
    throw flags.usage('--control or --cache is required (see pcache status --help)');
  },
};

export const checkGrammar: CommandGrammar<CheckArgs> = {
  spec: {
    summary: 'check a cache device structurally (without writing to it, unless --repair)',
    usage: ['pcache check --cache PATH [--json] [--repair]'],
    flags: {
      cache: valueFlag('PATH', 'the cache device to check (required; must be idle)'),
      json: switchFlag('print JSON: problems, warnings and a summary'),
      repair: switchFlag('first rewrite every damaged copy of a metadata record from its valid twin, then check'),
    },
    notes: [
      'Exits with status 1 if any problem is found, 0 if there are none (warnings allowed).',
      '--repair rewrites only copies whose twin is valid (superblock, cache_info, key_tail, dirty_tail,',
      'seg_info, segment generations); it never guesses and never touches the log or cached data.',
    ],
  },
  options: (flags) => ({ cachePath: flags.required('cache'), json: flags.has('json'), repair: flags.has('repair') }),
};

export const drainGrammar: CommandGrammar<DrainArgs> = {
  spec: {
    summary: 'write back all dirty data of a running server; returns once clean',
    usage: ['pcache drain --control PATH [--volume NAME] [--timeout SECONDS] [--progress]'],
    flags: {
      control: serverControlFlag,
      volume: valueFlag('NAME', 'on a server of volumes: drain this volume only (default: every volume)'),
      timeout: valueFlag('SECONDS', 'give up after this long (exit 1); default: wait until clean'),
      progress: switchFlag('show dirty bytes left, rate and time left on stderr while waiting'),
    },
    notes: [
      'Everything written before the drain started is on the backing device, synced, when it returns.',
      'Ctrl-C stops waiting (exit 130) and cancels nothing: the server finishes the drain it started.',
    ],
  },
  options(flags) {
    const seconds = flags.integer('timeout', secondsRange);
    return { controlPath: flags.required('control'), volume: flags.optional('volume'), timeoutMs: seconds === undefined ? undefined : seconds * 1000, progress: flags.has('progress') };
  },
};

/** Checkpoint names go into shell commands and snapshot names: a safe alphabet only. */
const checkpointNamePattern = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;

export const checkpointGrammar: CommandGrammar<CheckpointArgs> = {
  spec: {
    summary: 'bring the backing device to the last flushed state, hold it there while a command runs (a snapshot)',
    usage: ['pcache checkpoint --control PATH [--volume NAME] [--exec CMD] [--name NAME] [--timeout SECONDS] [--json]'],
    flags: {
      control: serverControlFlag,
      volume: volumeFlag,
      exec: valueFlag('CMD', 'run CMD (with sh -c) while the backing device is held, e.g. "rbd snap create rbd/img@{name}"'),
      name: valueFlag('NAME', 'the checkpoint\'s name (letters, digits, . _ -; default pcache-<UTC time>)'),
      timeout: valueFlag('SECONDS', 'give up after this long, the command included (exit 1); default: no limit'),
      json: switchFlag('print the result as JSON'),
    },
    notes: [
      'The server writes back everything its log held durably when the checkpoint began — every write',
      'whose flush (or FUA) had completed — and holds writeback there: the backing device then holds a',
      'crash-consistent state of the client\'s disk. CMD runs meanwhile, with {name}, {time} and {epoch}',
      'replaced, and PCACHE_CHECKPOINT_NAME, _TIME, _EPOCH in its environment; writeback resumes when',
      'it exits. Clients are not paused: their writes land in the cache while the backing device is held.',
      'Exits 1 if CMD fails (its status is printed) or the backing device cannot be reached in time.',
    ],
  },
  options(flags) {
    const seconds = flags.integer('timeout', secondsRange);
    const name = flags.optional('name');
    if (name !== undefined && !checkpointNamePattern.test(name)) {
      throw flags.usage(`--name must be 1 to 64 letters, digits, '.', '_' or '-' (starting with a letter or digit), got ${JSON.stringify(name)}`);
    }
    return { controlPath: flags.required('control'), volume: flags.optional('volume'), exec: flags.optional('exec'), name, timeoutMs: seconds === undefined ? undefined : seconds * 1000, json: flags.has('json') };
  },
};

export const invalidateGrammar: CommandGrammar<ControlArgs> = {
  spec: {
    summary: "drop every clean cached copy of a running server's cache (dirty data stays)",
    usage: ['pcache invalidate --control PATH [--volume NAME] [--json]'],
    flags: {
      control: serverControlFlag,
      volume: volumeFlag,
      json: switchFlag('print the result as JSON'),
    },
    notes: [
      'For a backing device that something else wrote to while pcache served it: the next reads of',
      'those ranges go to the backing device. (After a clean stop, pcache notices such writes itself.)',
      'The drop is recorded in the cache\'s log, so it holds across restarts. Needs format version 2.',
    ],
  },
  options: (flags) => ({ controlPath: flags.required('control'), volume: flags.optional('volume'), json: flags.has('json') }),
};

export const detachGrammar: CommandGrammar<ControlArgs> = {
  spec: {
    summary: 'write everything back, drop the clean copies, mark the cache detached, stop the server',
    usage: ['pcache detach --control PATH [--json]'],
    flags: {
      control: serverControlFlag,
      json: switchFlag('print the result as JSON'),
    },
    notes: [
      'The server stops taking client requests, writes every dirty byte back, drops every clean copy',
      'and records the cache as detached, then exits: the backing device can be used (and changed)',
      'without pcache. A later serve on the cache starts with nothing cached. Needs format version 2.',
    ],
  },
  options: (flags) => ({ controlPath: flags.required('control'), volume: undefined, json: flags.has('json') }),
};

export const setGrammar: CommandGrammar<SetArgs> = {
  spec: {
    summary: "change a running cache's write mode, gc_percent and other knobs, or list them",
    usage: ['pcache set --control PATH [--volume NAME] [NAME VALUE]...'],
    flags: {
      control: serverControlFlag,
      volume: volumeFlag,
      json: switchFlag('print the settings as JSON'),
    },
    positionals: true,
    notes: [
      'With no NAME VALUE pairs, lists every setting and its value. Settings:',
      `  mode  the write mode: ${cacheModes.join(', ')} (stored in the cache)`,
      ...knobNames.filter((name) => name !== modeSettingName).map((name) => `  ${name}  (an integer)`),
      'mode and gc_percent are stored in the cache; the others last until the server stops (see serve --tuning).',
      'All pairs of one command are checked first and applied together, or none is.',
    ],
  },
  options(flags) {
    const controlPath = flags.required('control');
    const words = flags.positionals;
    if (words.length % 2 !== 0) {
      throw flags.usage(`'${words[words.length - 1] ?? ''}' needs a value: give NAME VALUE pairs (see pcache set --help)`);
    }
    const changes: Record<string, KnobValue> = {};
    for (let index = 0; index < words.length; index += 2) {
      const name = words[index] ?? '';
      if (Object.hasOwn(changes, name)) throw flags.usage(`${name} given more than once`);
      changes[name] = name === modeSettingName ? modeFlagValue(flags, words[index + 1] ?? '') : knobValue(flags, '', name, words[index + 1] ?? '');
    }
    return { controlPath, volume: flags.optional('volume'), changes, json: flags.has('json') };
  },
};

export function gcPercentFlag(flags: Flags): number | undefined {
  return flags.integer('gc-percent', { min: 0, max: gcPercentMax });
}

/** Whether --backing names an NBD URI; a malformed one is a usage error saying what is wrong. */
export function backingIsUri(flags: Flags, text: string): boolean {
  if (!looksLikeNbdUri(text)) return false;
  flags.converted('backing', () => parseNbdUri(text));
  return true;
}

/** A write mode from text (`set mode MODE`, `serve --mode MODE`); anything else is a usage error naming the modes. */
export function modeFlagValue(flags: Flags, text: string): CacheMode {
  const chosen = modeValue(text);
  if ('problem' in chosen) throw flags.usage(chosen.problem);
  return chosen.mode;
}

/**
 * One setting's value from text; unknown names and bad values are usage errors, whose
 * message starts with the command and then `where` (say `--tuning: `).
 */
export function knobValue(flags: Flags, where: string, name: string, text: string): KnobValue {
  const knob = knobNamed(name);
  if (knob === undefined) throw flags.usage(`${where}unknown setting '${name}' (settings: ${knobNames.join(', ')})`);
  if (knob.choices !== undefined) {
    const problem = knobValueProblem(knob, text);
    if (problem !== undefined) throw flags.usage(`${where}${problem}`);
    return text;
  }
  const value = decimalInteger(text);
  const problem = knobValueProblem(knob, Number.isNaN(value) ? text : value);
  if (problem !== undefined) throw flags.usage(`${where}${problem}`);
  return value;
}
