// FaultInjector: scripted and seeded I/O failures for one simulated device.
//
// A test arms rules ("fail the next write with EIO", "fail every sync", "fail reads of this
// range with probability 0.1") or takes the device offline; SimDevice asks `decide` once per
// operation, when the operation is issued, and delivers the failure when the operation
// completes. Invariants: rules are tried in the order they were added and the first one that
// fires wins; a rule that has fired `times` times is retired; probabilistic rules draw from
// the device's seeded Prng, so a run's faults replay from its seed; while offline every
// operation fails with ENODEV and no rule is consulted (so none is consumed).

import { assert } from '../src/lib/assert.js';
import { PcacheError } from '../src/lib/errors.js';
import type { Prng } from './prng.js';

export type FaultOp = 'read' | 'write' | 'sync';
export type FaultCode = 'EIO' | 'ENOSPC' | 'ENODEV';

export interface FaultRule {
  /** Which operations the rule applies to. Discards count as writes. */
  readonly op: FaultOp | 'any';
  readonly code: FaultCode;
  /** Let this many matching operations pass before the rule may fire. Default 0. */
  readonly skip?: number;
  /** Fire this many times, then retire. Default 1; Infinity fails every matching operation. */
  readonly times?: number;
  /** Fire on a matching operation only with this probability. Default 1. */
  readonly probability?: number;
  /** Match only reads and writes that overlap this byte range (a sync never matches). */
  readonly range?: { readonly offsetBytes: number; readonly lengthBytes: number };
}

interface ArmedRule {
  readonly rule: FaultRule;
  skipLeft: number;
  timesLeft: number;
}

/** Bound on armed rules: tests script a handful; a runaway loop adding rules is a bug. */
const armedRulesMax = 1024;

export class FaultInjector {
  private readonly rules: ArmedRule[] = [];
  private offlineFlag = false;
  private injected = 0;

  constructor(
    private readonly prng: Prng,
    private readonly deviceName: string,
  ) {}

  /** Arms a rule; the returned function disarms it. */
  add(rule: FaultRule): () => void {
    const skip = rule.skip ?? 0;
    const times = rule.times ?? 1;
    assert(Number.isInteger(skip) && skip >= 0, `fault skip must be a count: ${skip}`);
    assert(times === Number.POSITIVE_INFINITY || (Number.isInteger(times) && times > 0), `fault times must be positive: ${times}`);
    assert(rule.probability === undefined || (rule.probability >= 0 && rule.probability <= 1), 'fault probability must be in [0, 1]');
    assert(this.rules.length < armedRulesMax, `more than ${armedRulesMax} fault rules armed`);
    const armed: ArmedRule = { rule, skipLeft: skip, timesLeft: times };
    this.rules.push(armed);
    return () => {
      const index = this.rules.indexOf(armed);
      if (index >= 0) this.rules.splice(index, 1);
    };
  }

  /** Fails the next matching operation (after `skip` more have passed). */
  failNext(op: FaultOp | 'any', code: FaultCode, options: Omit<FaultRule, 'op' | 'code' | 'times'> = {}): () => void {
    return this.add({ ...options, op, code, times: 1 });
  }

  /** Fails every matching operation until disarmed or cleared. */
  failEvery(op: FaultOp | 'any', code: FaultCode, options: Omit<FaultRule, 'op' | 'code' | 'times'> = {}): () => void {
    return this.add({ ...options, op, code, times: Number.POSITIVE_INFINITY });
  }

  /** Disarms every rule (the offline state is separate: see setOffline). */
  clear(): void {
    this.rules.length = 0;
  }

  get armedRuleCount(): number {
    return this.rules.length;
  }

  get offline(): boolean {
    return this.offlineFlag;
  }

  /** While offline, every operation fails with ENODEV, as for a device that has vanished. */
  setOffline(offline: boolean): void {
    this.offlineFlag = offline;
  }

  /** Failures injected so far (offline refusals included). */
  get injectedCount(): number {
    return this.injected;
  }

  /**
   * Decides whether one operation fails; consumes the rule that fires. `lengthBytes` is 0
   * for a sync, which has no range.
   */
  decide(op: FaultOp, offsetBytes: number, lengthBytes: number): PcacheError | undefined {
    if (this.offlineFlag) return this.count(this.offlineError(op));
    for (let index = 0; index < this.rules.length; index += 1) {
      const armed = this.rules[index];
      assert(armed !== undefined, 'rule index is inside the rule list');
      if (!matches(armed.rule, op, offsetBytes, lengthBytes)) continue;
      if (armed.skipLeft > 0) {
        armed.skipLeft -= 1;
        continue;
      }
      if (armed.rule.probability !== undefined && !this.prng.chance(armed.rule.probability)) continue;
      armed.timesLeft -= 1;
      if (armed.timesLeft <= 0) this.rules.splice(index, 1);
      return this.count(new PcacheError(armed.rule.code, `${this.deviceName}: injected ${armed.rule.code} on ${op}`));
    }
    return undefined;
  }

  /** The error for an operation that finds the device offline when it completes. */
  offlineError(op: FaultOp): PcacheError {
    return new PcacheError('ENODEV', `${this.deviceName}: device offline during ${op}`);
  }

  private count(error: PcacheError): PcacheError {
    this.injected += 1;
    return error;
  }
}

function matches(rule: FaultRule, op: FaultOp, offsetBytes: number, lengthBytes: number): boolean {
  if (rule.op !== 'any' && rule.op !== op) return false;
  if (rule.range === undefined) return true;
  if (op === 'sync') return false;
  const end = offsetBytes + lengthBytes;
  const ruleEnd = rule.range.offsetBytes + rule.range.lengthBytes;
  return offsetBytes < ruleEnd && rule.range.offsetBytes < end;
}
