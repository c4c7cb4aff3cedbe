// Assertions: the programmer-error half of pcache's two kinds of failure.
//
// A failed assertion means an invariant of the program is broken. The only safe response is
// to stop, so AssertionFailure is never caught and mapped to an I/O error the way an
// operating error (PcacheError, in errors.ts) is. Keep conditions simple and split compound
// ones, so a failure names the exact fact that did not hold.

export class AssertionFailure extends Error {
  override readonly name = 'AssertionFailure';
}

export function assert(condition: boolean, message?: string): asserts condition {
  if (!condition) throw new AssertionFailure(message ?? 'assertion failed');
}

/** Marks code that exhaustive switches make unreachable; the compiler checks `value: never`. */
export function unreachable(value: never, message?: string): never {
  throw new AssertionFailure(message ?? `unreachable: ${String(value)}`);
}
