// SwitchableExport: a volume's NBD export, whose cache can be replaced while clients stay
// connected (`pcache volume resize` formats the volume's share again at its new size).
//
// Normally every call goes straight to the current cache (one extra method call). While the
// cache is being replaced, calls wait behind a gate and then go to the new cache; the calls
// that reached the old cache before the gate closed finish inside its close() (Cache.close
// waits for in-flight requests). How many calls can wait is bounded by the NBD server's
// per-connection request limit, which stops reading a client's socket when it is reached.

import type { Export } from '../nbd/server/export.js';

type MaybePromise<T> = T | Promise<T>;

export class SwitchableExport implements Export {
  private current: Export;
  private gate: Promise<void> | undefined;
  private openGate: (() => void) | undefined;

  constructor(initial: Export) {
    this.current = initial;
  }

  get sizeBytes(): number {
    return this.current.sizeBytes;
  }

  /** From now on calls wait (until `resume`); the caller then closes the current cache. */
  pause(): void {
    if (this.gate !== undefined) return;
    this.gate = new Promise((resolve) => { this.openGate = resolve; });
  }

  /** Calls go to `next` (the new cache, or the old one again when replacing it failed). */
  resume(next: Export): void {
    this.current = next;
    this.gate = undefined;
    this.openGate?.();
    this.openGate = undefined;
  }

  read(target: Uint8Array, offsetBytes: number, client: number): MaybePromise<void> {
    if (this.gate !== undefined) return this.gate.then(() => this.current.read(target, offsetBytes, client));
    return this.current.read(target, offsetBytes, client);
  }

  write(source: Uint8Array, offsetBytes: number, options: Parameters<Export['write']>[2], client: number): MaybePromise<void> {
    if (this.gate !== undefined) return this.gate.then(() => this.current.write(source, offsetBytes, options, client));
    return this.current.write(source, offsetBytes, options, client);
  }

  flush(): MaybePromise<void> {
    if (this.gate !== undefined) return this.gate.then(() => this.current.flush());
    return this.current.flush();
  }

  trim(offsetBytes: number, lengthBytes: number, options: Parameters<Export['trim']>[2]): MaybePromise<void> {
    if (this.gate !== undefined) return this.gate.then(() => this.current.trim(offsetBytes, lengthBytes, options));
    return this.current.trim(offsetBytes, lengthBytes, options);
  }

  writeZeroes(offsetBytes: number, lengthBytes: number, options: Parameters<Export['writeZeroes']>[2]): MaybePromise<void> {
    if (this.gate !== undefined) return this.gate.then(() => this.current.writeZeroes(offsetBytes, lengthBytes, options));
    return this.current.writeZeroes(offsetBytes, lengthBytes, options);
  }

  cache(offsetBytes: number, lengthBytes: number): MaybePromise<void> {
    if (this.gate !== undefined) return this.gate.then(() => this.current.cache(offsetBytes, lengthBytes));
    return this.current.cache(offsetBytes, lengthBytes);
  }

  blockStatus(offsetBytes: number, lengthBytes: number): ReturnType<Export['blockStatus']> {
    if (this.gate !== undefined) return this.gate.then(() => this.current.blockStatus(offsetBytes, lengthBytes));
    return this.current.blockStatus(offsetBytes, lengthBytes);
  }
}
