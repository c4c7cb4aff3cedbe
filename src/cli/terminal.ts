// Terminal: where command output goes. Commands write through it instead of touching
// process.stdout/stderr, so main.ts alone decides what reaches the terminal (and tests of a
// command module could capture it). Results and reports go to `out`; `err` carries problems
// and progress that must not mix with output a script parses (`--json`).

export interface Terminal {
  /** One line (or a block of lines) of results, to standard output. */
  out(text: string): void;
  /** One line of diagnostics, to standard error. */
  err(text: string): void;
  /**
   * A progress line on standard error: redrawn in place on a terminal, printed as a line of
   * its own otherwise (a log file then shows its history). `done` ends the line.
   */
  progress(text: string, done?: boolean): void;
  /** Whether progress is redrawn in place (standard error is a terminal). */
  readonly interactive: boolean;
}

export const processTerminal: Terminal = {
  out(text) {
    process.stdout.write(`${text}\n`);
  },
  err(text) {
    process.stderr.write(`${text}\n`);
  },
  progress(text, done = false) {
    // \r returns to the line's start and ESC[K clears what a longer earlier line left behind.
    if (process.stderr.isTTY) process.stderr.write(`\r${text}\u001b[K${done ? '\n' : ''}`);
    else process.stderr.write(`${text}\n`);
  },
  get interactive() {
    return process.stderr.isTTY;
  },
};
