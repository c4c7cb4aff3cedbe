// BackgroundTask: a single-flight asynchronous loop that can be kicked.
//
// At most one run of the body is active. A kick while idle starts a run; a kick during a run
// makes the run go round once more, so no kick is ever lost — including one that arrives just
// as the body decides it has nothing left to do (the bug this class exists to prevent: a flag
// cleared in a .finally() callback leaves a window of one microtask in which kicks vanish).

export class BackgroundTask {
  private readonly body: () => Promise<void>;
  private active: Promise<void> | undefined;
  private kickedDuringRun = false;

  constructor(body: () => Promise<void>) {
    this.body = body;
  }

  get running(): boolean {
    return this.active !== undefined;
  }

  kick(): void {
    if (this.active !== undefined) {
      this.kickedDuringRun = true;
      return;
    }
    this.active = this.run();
  }

  /** Resolves once no run is active (a kick during the wait extends it). */
  async idle(): Promise<void> {
    while (this.active !== undefined) await this.active;
  }

  /** Read through a method: after an await the flag may have changed behind the compiler's back. */
  private wasKicked(): boolean {
    return this.kickedDuringRun;
  }

  private async run(): Promise<void> {
    try {
      do {
        this.kickedDuringRun = false;
        await this.body();
      } while (this.wasKicked());
    } finally {
      // Runs in the same turn as the body's last step: no window for a lost kick.
      this.active = undefined;
    }
  }
}

/**
 * Runs async sections one at a time, in call order. Used where a background loop and an
 * explicit step (tests, drain without background work) may both want to run a round: two
 * rounds must never overlap.
 */
export class SerialSection {
  private tail: Promise<unknown> = Promise.resolve();

  run<T>(section: () => Promise<T>): Promise<T> {
    const result = this.tail.then(section);
    this.tail = result.catch(() => undefined);
    return result;
  }
}
