// The command-line grammar: every command, its flags and help text, and the parsing and
// validation that turn argv into typed options. This file puts the commands together and
// answers --help and --version; args_parse.ts is the generic parser and help renderer,
// args_serve.ts and args_commands.ts hold each command's flag table and rules.
//
// Invariants:
// - argv is read only here (main.ts hands it over); every value is validated here, once, so a
//   command module receives options that are already in range;
// - every rejection is a UsageError whose message names the offending flag and fits on one
//   line (main.ts prints it as `pcache: <message>` and exits with exitUsage);
// - help text is generated from the same table the parser uses, so the two cannot disagree.

import { MiB } from '../lib/units.js';
import {
  checkGrammar, checkpointGrammar, detachGrammar, drainGrammar, formatGrammar, invalidateGrammar, setGrammar, statusGrammar, type CheckArgs, type CheckpointArgs, type ControlArgs,
  type DrainArgs, type FormatArgs, type SetArgs, type StatusArgs,
} from './args_commands.js';
import { commandHelp, parseFlags, UsageError, type CommandGrammar, type CommandName } from './args_parse.js';
import { serveGrammar, type ServeArgs } from './args_serve.js';
import { volumeGrammar, type VolumeArgs } from './args_volume.js';

export { UsageError, type CommandName } from './args_parse.js';
export type { CheckArgs, CheckpointArgs, ControlArgs, DrainArgs, FormatArgs, SetArgs, StatusArgs } from './args_commands.js';
export { defaultServe, insecureBindProblem, isLoopback, logLevels, type ListenArgs, type LogLevel, type MetricsArgs, type ServeArgs, type TlsArgs } from './args_serve.js';

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

export type Invocation =
  | { readonly command: 'help'; readonly text: string }
  | { readonly command: 'version' }
  | { readonly command: 'format'; readonly args: FormatArgs }
  | { readonly command: 'serve'; readonly args: ServeArgs }
  | { readonly command: 'status'; readonly args: StatusArgs }
  | { readonly command: 'check'; readonly args: CheckArgs }
  | { readonly command: 'drain'; readonly args: DrainArgs }
  | { readonly command: 'set'; readonly args: SetArgs }
  | { readonly command: 'invalidate'; readonly args: ControlArgs }
  | { readonly command: 'detach'; readonly args: ControlArgs }
  | { readonly command: 'checkpoint'; readonly args: CheckpointArgs }
  | { readonly command: 'volume'; readonly args: VolumeArgs };

/** Every command's grammar, in the order the overview lists them. */
const grammars: { readonly [Name in CommandName]: CommandGrammar<Extract<Invocation, { command: Name }>['args']> } = {
  format: formatGrammar,
  serve: serveGrammar,
  status: statusGrammar,
  check: checkGrammar,
  drain: drainGrammar,
  set: setGrammar,
  invalidate: invalidateGrammar,
  detach: detachGrammar,
  checkpoint: checkpointGrammar,
  volume: volumeGrammar,
};

const commandNames = Object.keys(grammars) as CommandName[];

export function parseCommandLine(argv: readonly string[]): Invocation {
  const [first, ...rest] = argv;
  if (first === undefined) throw new UsageError('no command given (see pcache --help)');
  if (first === '--help' || first === '-h') return { command: 'help', text: overviewHelp() };
  if (first === '--version' || first === '-V') return { command: 'version' };
  if (first === 'help') {
    const topic = rest[0];
    if (topic === undefined) return { command: 'help', text: overviewHelp() };
    const name = commandNamed(topic);
    return { command: 'help', text: commandHelp(name, grammars[name].spec) };
  }
  const name = commandNamed(first);
  const flags = parseFlags(name, grammars[name].spec, rest);
  if (flags.has('help')) return { command: 'help', text: commandHelp(name, grammars[name].spec) };
  return invocationOf(name, grammars[name].options(flags));
}

/** The invocation of command `name` with its options (the grammar table pairs each command with its options' type). */
function invocationOf<Name extends CommandName>(name: Name, args: Extract<Invocation, { command: Name }>['args']): Invocation {
  return { command: name, args } as Extract<Invocation, { command: Name }>;
}

function commandNamed(text: string): CommandName {
  const name = commandNames.find((candidate) => candidate === text);
  if (name === undefined) {
    const what = text.startsWith('-') ? `unknown option ${text}` : `unknown command '${text}'`;
    throw new UsageError(`${what} (commands: ${commandNames.join(', ')}; see pcache --help)`);
  }
  return name;
}

function overviewHelp(): string {
  const lines = [
    'pcache: a persistent, crash-safe write-back cache for block devices, served over NBD',
    '',
    'Usage: pcache <command> [options]',
    '',
    'Commands:',
    ...commandNames.map((name) => `  ${name.padEnd(8)} ${grammars[name].spec.summary}`),
    '',
    'Run `pcache <command> --help` for a command\'s options; `pcache --version` for the version.',
    `Exit status: ${exitOk} success, ${exitFailure} the operation failed or was refused (or check found problems),`,
    `${exitUsage} a mistake in the command line, ${exitInternal} an internal error (a bug; please report it),`,
    `${exitInterrupted} drain stopped waiting on Ctrl-C (the server goes on with the drain).`,
    `Sizes take the suffixes K, M, G and T (binary: 1M = ${MiB} bytes).`,
  ];
  return lines.join('\n');
}
