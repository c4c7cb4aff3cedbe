// Assertions: the programmer-error half of pcache's two kinds of failure.
//
// A failed assertion means an invariant of the program is broken. The only safe response is
// to stop, so AssertionFailure is never caught and mapped to an I/O error the way an
// operating error (PcacheError, in errors.ts) is. Keep conditions simple and split compound
// ones, so a failure names the exact fact that did not hold.
//
// Messages are constant strings: a template literal would be built on every call, and these
// checks run several times per request (number-to-string conversions showed up in profiles
// of the write path). The value worth reporting goes in `detail`, formatted only on failure.

export class AssertionFailure extends Error {
  override readonly name = 'AssertionFailure';
}

export function assert(condition: boolean, message?: string, detail?: string | number): asserts condition {
  if (!condition) throw new AssertionFailure(failureMessage(message, detail));
}

function failureMessage(message: string | undefined, detail: string | number | undefined): string {
  const text = message ?? 'assertion failed';
  return detail === undefined ? text : `${text}: ${String(detail)}`;
}

/** Marks code that exhaustive switches make unreachable; the compiler checks `value: never`. */
export function unreachable(value: never, message?: string): never {
  throw new AssertionFailure(message ?? `unreachable: ${String(value)}`);
}
