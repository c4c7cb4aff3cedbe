// The generic half of the command-line grammar: how a command's flag table is described, how
// argv is checked against it, how a flag's text becomes a typed value, and how help is
// rendered from the same table. It knows no command; args_commands.ts and args_serve.ts hold
// the tables and the rules of each command, and args.ts puts them together.
//
// Invariants (args.ts's header has the whole list):
// - every rejection is a UsageError whose message starts with the command, names the offending
//   flag and fits on one line;
// - the parser and the help read the same CommandSpec, and every command takes -h/--help.

import { parseArgs } from 'node:util';
import { isPcacheError } from '../lib/errors.js';
import { parseSize } from '../lib/units.js';

/** A mistake in the command line. */
export class UsageError extends Error {
  override readonly name = 'UsageError';
}

export type CommandName = 'format' | 'serve' | 'status' | 'check' | 'drain' | 'set' | 'invalidate' | 'detach' | 'checkpoint' | 'volume';

export interface FlagSpec {
  readonly kind: 'string' | 'boolean';
  /** The placeholder shown in help for a string flag (PATH, SIZE, N). */
  readonly value?: string;
  readonly help: string;
}

export interface CommandSpec {
  readonly summary: string;
  readonly usage: readonly string[];
  /** The command's flags, in the order help lists them; -h/--help is added to every command. */
  readonly flags: Readonly<Record<string, FlagSpec>>;
  /** Whether positional arguments are taken (only `set`: NAME VALUE pairs). */
  readonly positionals?: boolean;
  readonly notes: readonly string[];
}

/** A command's grammar: its table, and the rules that turn its parsed flags into typed options. */
export interface CommandGrammar<Args> {
  readonly spec: CommandSpec;
  options(flags: Flags): Args;
}

/** A flag that takes a value, shown in help as `--flag PLACEHOLDER`. */
export function valueFlag(placeholder: string, help: string): FlagSpec {
  return { kind: 'string', value: placeholder, help };
}

/** A flag that takes no value. */
export function switchFlag(help: string): FlagSpec {
  return { kind: 'boolean', help };
}

/** An inclusive range of integers. */
export interface IntegerRange {
  readonly min: number;
  readonly max: number;
}

/** `--timeout`, `--drain-timeout`: whole seconds, up to a year. */
export const secondsRange: IntegerRange = { min: 1, max: 365 * 24 * 3600 };

/** The flags given to one command, already checked against its table; values are read through the typed getters. */
export class Flags {
  /** The command, which starts every message. */
  readonly command: CommandName;
  /** The positional arguments, in order (only commands whose spec takes them have any). */
  readonly positionals: readonly string[];
  /** Whether the command was given no arguments at all. */
  readonly empty: boolean;
  private readonly values: ReadonlyMap<string, string | true>;

  constructor(command: CommandName, values: ReadonlyMap<string, string | true>, positionals: readonly string[], empty: boolean) {
    this.command = command;
    this.values = values;
    this.positionals = positionals;
    this.empty = empty;
  }

  has(flag: string): boolean {
    return this.values.has(flag);
  }

  optional(flag: string): string | undefined {
    const value = this.values.get(flag);
    return typeof value === 'string' ? value : undefined;
  }

  required(flag: string): string {
    const value = this.optional(flag);
    if (value === undefined) throw this.usage(`--${flag} is required (see pcache ${this.command} --help)`);
    return value;
  }

  /** A size with an optional binary suffix (16M), larger than zero. */
  size(flag: string): number | undefined {
    const text = this.optional(flag);
    if (text === undefined) return undefined;
    const bytes = this.converted(flag, () => parseSize(text));
    if (bytes <= 0) throw this.usage(`--${flag} must be larger than zero`);
    return bytes;
  }

  /** A decimal integer within `range`. */
  integer(flag: string, range: IntegerRange): number | undefined {
    const text = this.optional(flag);
    if (text === undefined) return undefined;
    const value = decimalInteger(text);
    if (!Number.isSafeInteger(value) || value < range.min || value > range.max) {
      throw this.usage(`--${flag} must be an integer from ${range.min} to ${range.max}, got '${text}'`);
    }
    return value;
  }

  /** Runs a conversion whose PcacheError (a bad size, a bad URI) becomes a usage error naming `flag`. */
  converted<T>(flag: string, convert: () => T): T {
    try {
      return convert();
    } catch (error) {
      if (isPcacheError(error)) throw this.usage(`--${flag}: ${error.message}`);
      throw error;
    }
  }

  /** A UsageError for this command: `<command>: <message>`. */
  usage(message: string): UsageError {
    return new UsageError(`${this.command}: ${message}`);
  }
}

/** `text` as a non-negative decimal integer, or NaN (no sign, no fraction, no exponent). */
export function decimalInteger(text: string): number {
  return /^\d+$/.test(text) ? Number(text) : Number.NaN;
}

/** Parses `args` against `name`'s flag table; anything unknown, repeated or malformed is a UsageError. */
export function parseFlags(name: CommandName, spec: CommandSpec, args: readonly string[]): Flags {
  const table = flagTable(spec);
  const options: Record<string, { type: 'string' | 'boolean'; short?: string }> = {};
  for (const [flag, flagSpec] of Object.entries(table)) options[flag] = { type: flagSpec.kind };
  options.help = { type: 'boolean', short: 'h' };
  // strict: false, so that every mistake is reported here, in one line, in our words.
  const { tokens } = parseArgs({ args: [...args], options, strict: false, allowPositionals: true, tokens: true });
  const values = new Map<string, string | true>();
  const positionals: string[] = [];
  const hint = `see pcache ${name} --help`;
  for (const token of tokens) {
    if (token.kind === 'option-terminator') continue;
    if (token.kind === 'positional') {
      if (spec.positionals !== true) throw new UsageError(`${name}: unexpected argument '${token.value}' (${hint})`);
      positionals.push(token.value);
      continue;
    }
    const flagSpec = table[token.name];
    if (flagSpec === undefined) throw new UsageError(`${name}: unknown option ${token.rawName} (${hint})`);
    if (values.has(token.name)) throw new UsageError(`${name}: ${token.rawName} given more than once`);
    if (flagSpec.kind === 'boolean') {
      if (token.value !== undefined) throw new UsageError(`${name}: ${token.rawName} takes no value`);
      values.set(token.name, true);
      continue;
    }
    const value = token.value;
    // `--cache --backing x` would take "--backing" as the path: treat it as a missing value.
    if (value === undefined || (!token.inlineValue && value.startsWith('-'))) {
      throw new UsageError(`${name}: ${token.rawName} needs a value (${flagSpec.value ?? 'VALUE'})`);
    }
    if (value === '') throw new UsageError(`${name}: ${token.rawName} needs a non-empty value`);
    values.set(token.name, value);
  }
  return new Flags(name, values, positionals, args.length === 0);
}

/** `pcache <name> --help`, from the table the parser reads. */
export function commandHelp(name: CommandName, spec: CommandSpec): string {
  const rows = Object.entries(flagTable(spec)).map(([flag, flagSpec]) => {
    const shown = flag === 'help' ? '-h, --help' : `--${flag}${flagSpec.value === undefined ? '' : ` ${flagSpec.value}`}`;
    return `  ${shown.padEnd(24)} ${flagSpec.help}`;
  });
  return [`pcache ${name}: ${spec.summary}`, '', 'Usage:', ...spec.usage.map((line) => `  ${line}`), '', 'Options:', ...rows, '', ...spec.notes].join('\n');
}

const helpFlag = switchFlag('show this help and exit');

/** The command's flags and --help, which every command takes (listed last). */
function flagTable(spec: CommandSpec): Readonly<Record<string, FlagSpec>> {
  return { ...spec.flags, help: helpFlag };
}
