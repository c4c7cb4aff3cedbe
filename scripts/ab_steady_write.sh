#!/bin/bash
# One steady-state write run of one build, for paired comparisons of two builds' CPU per write.
#
# Usage: scripts/ab_steady_write.sh TREE LABEL [pcache serve arguments...]
#   TREE: a built checkout (its dist/src/cli/main.js is run), e.g. `git archive BASE | tar -x -C
#   /tmp/base`, node_modules linked, `npx tsc -p tsconfig.json`.
# Run it for the two builds in turn, several times, alternating which goes first, with nothing
# else running; compare the medians of the per-pair ratios (docs/performance.md, "Steady state").
#
# What it does: a new 1 GiB cache file (sparse, formatted by `serve --cache-size`) in front of a
# 1 GiB file of zeroes, both on /dev/shm; fio's nbd engine writes 4 KiB random blocks at QD32
# over the whole range for 30 s, which wraps the cache several times. From 10 s to 30 s it
# samples the server's CPU time (user + system, /proc/PID/stat, all threads, and per thread)
# and fio's per-second write counts, and prints IOPS and CPU per client write over that window.
set -u
tree=$1
label=$2
shift 2
dir=$(mktemp -d /dev/shm/pcache-ab.XXXXXX)
trap 'rm -rf "$dir"' EXIT
dd if=/dev/zero of="$dir/backing" bs=1M count=1024 status=none
ticks() { awk '{print $14 + $15}' "$1"; }
threadTicks() { for t in /proc/"$1"/task/*; do echo "$(basename "$t") $(ticks "$t/stat")"; done; }
node "$tree/dist/src/cli/main.js" serve --cache "$dir/cache.img" --cache-size 1G --backing "$dir/backing" \
  --socket "$dir/nbd.sock" --control "$dir/control.sock" --log-level warn "$@" > "$dir/serve.out" 2>&1 &
pid=$!
for _ in $(seq 100); do grep -q '^serving' "$dir/serve.out" 2>/dev/null && break; sleep 0.1; done
fio --name=write --ioengine=nbd --uri="nbd+unix:///?socket=$dir/nbd.sock" --rw=randwrite --bs=4k --iodepth=32 \
  --size=1g --thread --time_based --runtime=30s --norandommap --randrepeat=0 \
  --write_iops_log="$dir/fio" --log_avg_msec=1000 > "$dir/fio.out" 2>&1 &
fio=$!
sleep 10
c0=$(ticks /proc/$pid/stat); threadTicks $pid > "$dir/threads0"
sleep 20
c1=$(ticks /proc/$pid/stat); threadTicks $pid > "$dir/threads1"
wait $fio
kill $pid
wait $pid 2>/dev/null
hz=$(getconf CLK_TCK)
awk -F', *' -v label="$label" -v c0="$c0" -v c1="$c1" -v hz="$hz" '
  FILENAME ~ /threads0$/ { before[$1] = $2; next }
  FILENAME ~ /threads1$/ { split($0, f, " "); used[f[1]] = f[2] - before[f[1]]; next }
  $1 > 10000 && $1 <= 30000 { writes += $2; seconds++ }
  END {
    cpu = (c1 - c0) / hz
    top = ""
    for (k = 0; k < 3; k++) {
      best = ""; for (t in used) if (best == "" || used[t] > used[best]) best = t
      if (best == "") break
      top = top sprintf(" %.2f", used[best] / hz / writes * 1e6); delete used[best]
    }
    printf "%s: %.0f IOPS (10-30 s), server CPU %.2f cores, %.2f us per write (busiest threads:%s us)\n", label, writes / seconds, cpu / 20, cpu / writes * 1e6, top
  }' FS=' ' "$dir/threads0" FS=' ' "$dir/threads1" FS=', *' "$dir/fio_iops.1.log"
