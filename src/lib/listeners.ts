// Listeners: callbacks that one part calls and others register with.
//
// The cache's parts are built in a fixed order (the kset log before writeback, writeback before
// GC), and a part built early must still be able to announce things to parts built after it —
// "the log became durable up to here", "dirty_tail moved" — without knowing them or holding a
// field that is filled in later. The part owns a Listeners and calls it; whoever assembles
// the parts registers with it. Listeners run synchronously, in the order they were added.

export class Listeners<Args extends unknown[] = []> {
  private readonly callbacks: ((...args: Args) => void)[] = [];

  add(callback: (...args: Args) => void): void {
    this.callbacks.push(callback);
  }

  call(...args: Args): void {
    for (const callback of this.callbacks) callback(...args);
  }
}
