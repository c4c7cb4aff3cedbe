// The knobs an operator can change on a running cache (`pcache set`, `serve --tuning`): their
// snake_case names, units, ranges and help, and the one place that validates a set of changes
// and applies it to a Cache.
//
// Invariants:
// - The table is the single source of names: the command-line grammar, the control socket,
//   `pcache set` with no knob and docs/operations.md all list the same knobs in this order.
// - A set of changes is validated completely (names, integer values, ranges, and the one
//   cross-field rule, writeback_stop_percent <= writeback_start_percent) before any of it is
//   applied, so a refused `set` changes nothing.
// - gc_percent is persisted in cache_info (as dm-pcache's `gc_percent` message); the other
//   knobs are runtime tuning (CacheTuning), lost at restart unless given to `serve --tuning`.
// - `mode` (the write mode, a word rather than an integer) is a setting too, listed first and
//   persisted in cache_info; `serve --mode` chooses it at start.

import type { Cache, CacheTuning } from '../cache/cache.js';
import { PcacheError } from '../lib/errors.js';
import { defaultTuning, fragmentedReadPiecesMax, sequentialCutoffBytesMax, writebackOrderings } from '../cache/cache_tuning.js';
import { cacheModeNamed, cacheModes, type CacheMode } from '../ondisk/cache_info.js';
import { gcPercentDefault, gcPercentMax } from '../ondisk/layout.js';

/**
 * The longest duration a knob accepts: Node's timers take at most 2^31-1 ms (about 24.8 days)
 * and fire at once for anything longer, which would turn "never" into "now".
 */
export const knobDurationMaxMs = 2_147_483_647;

/** A knob's value: an integer (percent, ms) or one of a choice knob's words. */
export type KnobValue = number | string;

export interface Knob {
  readonly name: string;
  /** The CacheTuning field it sets; undefined for gc_percent (persisted through setGcPercent). */
  readonly field: keyof CacheTuning | undefined;
  readonly unit: 'percent' | 'ms' | 'bytes' | 'count' | 'choice';
  /** For a numeric knob, its range. */
  readonly min: number;
  readonly max: number;
  /** For a choice knob, the words it takes. */
  readonly choices?: readonly string[];
  readonly persisted: boolean;
  /** The value a server starts with: gcPercentDefault for a fresh cache, defaultTuning for the others. */
  readonly defaultValue: KnobValue;
  readonly help: string;
}

export const knobs: readonly Knob[] = [
  { name: 'gc_percent', field: undefined, unit: 'percent', min: 0, max: gcPercentMax, persisted: true, defaultValue: gcPercentDefault, help: 'GC starts when this % of segments are in use (stored in the cache)' },
  { name: 'writeback_start_percent', field: 'writebackStartPercent', unit: 'percent', min: 0, max: 100, persisted: false, defaultValue: defaultTuning.writebackStartPercent, help: 'writeback starts when dirty data reaches this % of the cache' },
  { name: 'writeback_stop_percent', field: 'writebackStopPercent', unit: 'percent', min: 0, max: 100, persisted: false, defaultValue: defaultTuning.writebackStopPercent, help: '...and goes on until dirty data is down to this % (<= start)' },
  { name: 'writeback_idle_ms', field: 'writebackIdleMs', unit: 'ms', min: 0, max: knobDurationMaxMs, persisted: false, defaultValue: defaultTuning.writebackIdleMs, help: 'after this long without client writes, everything dirty is written back' },
  { name: 'writeback_max_age_ms', field: 'writebackMaxAgeMs', unit: 'ms', min: 0, max: knobDurationMaxMs, persisted: false, defaultValue: defaultTuning.writebackMaxAgeMs, help: 'data dirty longer than this is written back even under load' },
  { name: 'dirty_high_water_percent', field: 'dirtyHighWaterPercent', unit: 'percent', min: 0, max: 100, persisted: false, defaultValue: defaultTuning.dirtyHighWaterPercent, help: 'backing offline: writes are held once dirty data reaches this % of the cache' },
  { name: 'backing_offline_after_ms', field: 'backingOfflineAfterMs', unit: 'ms', min: 0, max: knobDurationMaxMs, persisted: false, defaultValue: defaultTuning.backingOfflineAfterMs, help: 'writeback failing this long marks the backing device offline' },
  { name: 'writeback_ordering', field: 'writebackOrdering', unit: 'choice', min: 0, max: 0, choices: writebackOrderings, persisted: false, defaultValue: defaultTuning.writebackOrdering, help: 'strict: the backing device alone always holds a prefix of the flush epochs; relaxed: larger merges across epochs' },
  { name: 'sequential_cutoff_bytes', field: 'sequentialCutoffBytes', unit: 'bytes', min: 0, max: sequentialCutoffBytesMax, persisted: false, defaultValue: defaultTuning.sequentialCutoffBytes, help: 'a sequential stream longer than this bypasses the cache; 0 turns it off' },
  { name: 'fragmented_read_pieces', field: 'fragmentedReadPieces', unit: 'count', min: 0, max: fragmentedReadPiecesMax, persisted: false, defaultValue: defaultTuning.fragmentedReadPieces, help: 'a cached read of >= 64 KiB with this many pieces written back is read from the backing device, newer pieces copied over it; 0 turns it off' },
  { name: 'fragmented_rewrite_pieces', field: 'fragmentedRewritePieces', unit: 'count', min: 0, max: fragmentedReadPiecesMax, persisted: false, defaultValue: defaultTuning.fragmentedRewritePieces, help: 'a cached read of <= 4 MiB with this many pieces not yet written back is stored again as one piece (writeback mode); 0 turns it off' },
  { name: 'fragmented_thread_pieces', field: 'fragmentedThreadPieces', unit: 'count', min: 0, max: fragmentedReadPiecesMax, persisted: false, defaultValue: defaultTuning.fragmentedThreadPieces, help: 'a read of >= 64 KiB from this many cached pieces reads them on the cache device\'s own thread, not the event loop; 0 turns it off' },
  { name: 'space_wait_timeout_ms', field: 'spaceWaitTimeoutMs', unit: 'ms', min: 0, max: knobDurationMaxMs, persisted: false, defaultValue: defaultTuning.spaceWaitTimeoutMs, help: 'a held write fails with ETIMEDOUT after this long; 0 holds it forever' },
];

/** The write mode's setting: a word from cacheModes, stored in the cache. */
export const modeSettingName = 'mode';

/** Every setting's name: the mode, then the knobs. */
export const knobNames: readonly string[] = [modeSettingName, ...knobs.map((knob) => knob.name)];

/** The mode named `value`, or the message saying why it is not one. */
export function modeValue(value: unknown): { mode: CacheMode } | { problem: string } {
  const mode = typeof value === 'string' ? cacheModeNamed(value) : undefined;
  if (mode === undefined) return { problem: `mode must be one of ${cacheModes.join(', ')}, got ${JSON.stringify(value)}` };
  return { mode };
}

export function knobNamed(name: string): Knob | undefined {
  return knobs.find((knob) => knob.name === name);
}

/** Why `value` is not acceptable for `knob`, or undefined. */
export function knobValueProblem(knob: Knob, value: unknown): string | undefined {
  if (knob.choices !== undefined) {
    return typeof value === 'string' && knob.choices.includes(value) ? undefined : `${knob.name} must be ${knob.choices.join(' or ')}, got ${JSON.stringify(value)}`;
  }
  if (typeof value !== 'number' || !Number.isSafeInteger(value) || value < knob.min || value > knob.max) {
    const unit = knob.unit === 'percent' ? ' (percent)' : knob.unit === 'bytes' ? ' (bytes)' : knob.unit === 'count' ? '' : ' (milliseconds)';
    return `${knob.name} must be an integer from ${knob.min} to ${knob.max}${unit}, got ${JSON.stringify(value)}`;
  }
  return undefined;
}

/** The value of every knob now in force, in table order. */
export function currentSettings(cache: Cache): Record<string, KnobValue> {
  const tuning = cache.tuning;
  const settings: Record<string, KnobValue> = { [modeSettingName]: cache.mode };
  for (const knob of knobs) settings[knob.name] = knob.field === undefined ? cache.status().gcPercent : tuning[knob.field];
  return settings;
}

/**
 * Checks a set of changes (`{name: value}`) completely and returns it as a runtime-tuning
 * part and an optional gc_percent; throws PcacheError EINVAL naming the first problem.
 */
export function validateSettings(cache: Cache, changes: Readonly<Record<string, unknown>>): { tuning: Partial<CacheTuning>; gcPercent: number | undefined; mode: CacheMode | undefined } {
  const tuning: Record<string, KnobValue> = {};
  let gcPercent: number | undefined;
  let mode: CacheMode | undefined;
  const names = Object.keys(changes);
  if (names.length === 0) throw new PcacheError('EINVAL', `no setting given (settings: ${knobNames.join(', ')})`);
  for (const name of names) {
    if (name === modeSettingName) {
      const chosen = modeValue(changes[name]);
      if ('problem' in chosen) throw new PcacheError('EINVAL', chosen.problem);
      mode = chosen.mode;
      continue;
    }
    const knob = knobNamed(name);
    if (knob === undefined) throw new PcacheError('EINVAL', `unknown setting ${JSON.stringify(name)} (settings: ${knobNames.join(', ')})`);
    const value = changes[name];
    const problem = knobValueProblem(knob, value);
    if (problem !== undefined) throw new PcacheError('EINVAL', problem);
    if (knob.field === undefined) gcPercent = value as number;
    else tuning[knob.field] = value as KnobValue;
  }
  const merged: CacheTuning = { ...cache.tuning, ...tuning };
  const problem = watermarkProblem(merged.writebackStartPercent, merged.writebackStopPercent);
  if (problem !== undefined) throw new PcacheError('EINVAL', `${problem}; set both in one command to move them past each other`);
  // Every value was checked against its knob, whose field it names: the shape is CacheTuning's.
  return { tuning, gcPercent, mode };
}

/** The one rule between knobs: writeback stops at or below where it starts. */
export function watermarkProblem(startPercent: number, stopPercent: number): string | undefined {
  if (stopPercent <= startPercent) return undefined;
  return `writeback_stop_percent (${stopPercent}) must not exceed writeback_start_percent (${startPercent})`;
}

/** Validates and applies a set of changes; returns every knob's value afterwards. */
export async function applySettings(cache: Cache, changes: Readonly<Record<string, unknown>>): Promise<Record<string, KnobValue>> {
  const { tuning, gcPercent, mode } = validateSettings(cache, changes);
  // The mode first: the one change a cache may still refuse (format version 1), before any other is made.
  if (mode !== undefined) await cache.setMode(mode);
  if (Object.keys(tuning).length > 0) cache.setTuning(tuning);
  if (gcPercent !== undefined) await cache.setGcPercent(gcPercent);
  return currentSettings(cache);
}
