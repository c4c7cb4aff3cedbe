// Terminal: where command output goes. Commands write through it instead of touching
// process.stdout/stderr, so main.ts alone decides what reaches the terminal (and tests of a
// command module could capture it). Results and reports go to `out`; `err` carries problems
// and progress that must not mix with output a script parses (`--json`).

export interface Terminal {
  /** One line (or a block of lines) of results, to standard output. */
  out(text: string): void;
  /** One line of diagnostics, to standard error. */
  err(text: string): void;
}

export const processTerminal: Terminal = {
  out(text) {
    process.stdout.write(`${text}\n`);
  },
  err(text) {
    process.stderr.write(`${text}\n`);
  },
};
