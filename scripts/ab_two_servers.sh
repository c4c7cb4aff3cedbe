#!/bin/bash
# Two builds (or two settings) side by side under steady 4 KiB random writes, for paired A/B.
#
# Usage: scripts/ab_two_servers.sh TREE_A ENV_A TREE_B ENV_B PAIRS SECONDS
#   TREE_x: a built checkout (its dist/src/cli/main.js is run); ENV_x: one VAR=value for that
#   server (`X=1` for none), e.g. NODE_OPTIONS=--max-semi-space-size=64.
# What it does: starts both servers at once, each with a new 1 GiB cache file (sparse, formatted
# by `serve --cache-size`) in front of its own 1 GiB file of zeroes, on /dev/shm; warms each with
# 20 s of fio (nbd engine, 4 KiB random writes at QD32 over the whole range, which wraps the
# cache); then runs PAIRS pairs of SECONDS-long runs, A and B back to back in an order that
# alternates. Prints each run's IOPS and the server's CPU per client write (user + system, all
# threads, /proc/PID/stat), and per pair B/A for both. Compare medians of the pair ratios, and
# calibrate with an A/A run (the same build twice) first: on a shared 2-CPU VM the pair ratios
# of two identical servers spread from 0.95 to 1.07 (docs/performance.md, "At the edge").
set -u
treeA=$1; envA=$2; treeB=$3; envB=$4; pairs=$5; seconds=$6
dir=$(mktemp -d /dev/shm/pcache-ab2.XXXXXX)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait; rm -rf "$dir"' EXIT
for x in a b; do
  if [ $x = a ]; then tree=$treeA; env=$envA; else tree=$treeB; env=$envB; fi
  dd if=/dev/zero of="$dir/backing-$x" bs=1M count=1024 status=none
  env "$env" node "$tree/dist/src/cli/main.js" serve --cache "$dir/cache-$x.img" --cache-size 1G --backing "$dir/backing-$x" \
    --socket "$dir/nbd-$x.sock" --control "$dir/control-$x.sock" --log-level warn > "$dir/serve-$x.out" 2>&1 &
  pids+=($!)
  for _ in $(seq 100); do grep -q '^serving' "$dir/serve-$x.out" 2>/dev/null && break; sleep 0.1; done
done
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# run x seconds: prints "IOPS CPU-microseconds-per-write"
run() {
  local pid=${pids[0]}
  [ "$1" = b ] && pid=${pids[1]}
  local before; before=$(ticks "$pid")
  fio --name=write --ioengine=nbd --uri="nbd+unix:///?socket=$dir/nbd-$1.sock" --rw=randwrite --bs=4k --iodepth=32 \
    --size=1g --thread --time_based --runtime="$2s" --norandommap --randrepeat=0 --output-format=json > "$dir/fio.json" 2>&1
  local after; after=$(ticks "$pid")
  python3 -c "
import json
text = open('$dir/fio.json').read()
iops = json.loads(text[text.index('{'):])['jobs'][0]['write']['iops']
print(int(iops), round(($after - $before) / $(getconf CLK_TCK) * 1e6 / (iops * $2), 2))"
}
echo "warm: a $(run a 20), b $(run b 20)"
for pair in $(seq "$pairs"); do
  if [ $((pair % 2)) = 1 ]; then A=$(run a "$seconds"); B=$(run b "$seconds"); else B=$(run b "$seconds"); A=$(run a "$seconds"); fi
  echo "pair $pair: a $A, b $B, b/a $(python3 -c "print(round(${B% *} / ${A% *}, 3), 'cpu', round(${B#* } / ${A#* }, 3))")"
done
