#!/usr/bin/env bash
# DRBD side by side (ci/lab/lab.sh drbd), sourced by lab.sh.
#
# DRBD 8.4 (the guest kernel's module, drbd-utils from Debian), protocol C, between the same two
# machines over the same network, on a second virtual disk of the same kind as the first (raw,
# cache=none); fio with O_DIRECT + O_DSYNC, random writes on /dev/drbd0. libmirror: `mirror
# primary` on the same machines, its files on the first disk's ext4, every write waiting for the
# backup (`block`), random slots of the region. Flushes on (DRBD's default disk-flushes and
# md-flushes) against our `power`; off against our `process`.
DRBD_SECONDS=${DRBD_SECONDS:-8}

drbd_conf() {
  local flushes=$1
  cat <<CONF
global { usage-count no; }
resource lab {
  protocol C;
  disk {
    disk-flushes $flushes;
    md-flushes $flushes;
    # The resync at full speed (the default controller would pace it).
    c-plan-ahead 0;
    resync-rate 1000M;
  }
  net {
    cram-hmac-alg sha256;
    shared-secret "$(od -An -tx1 "$lab/secret" | tr -d ' \n' | head -c 32)";
  }
  on a { device /dev/drbd0; disk /dev/vdb; address 10.78.0.1:7789; meta-disk internal; }
  on b { device /dev/drbd0; disk /dev/vdb; address 10.78.0.2:7789; meta-disk internal; }
}
CONF
}

drbdadm_lab() { echo "drbdadm -c /run/lab/drbd.conf $*"; }

# Both machines: metadata, attach, connect; then skip the initial sync (both disks are blank:
# `new-current-uuid --clear-bitmap`, DRBD's documented way) and make a the primary.
drbd_up() {
  local m
  for m in a b; do drbd_conf yes >"$lab/$m/share/drbd.conf"; done
  for m in a b; do
    lab_run "$m" "modprobe drbd && echo yes | $(drbdadm_lab create-md --force lab) >/dev/null 2>&1 &&
$(drbdadm_lab up lab)" 60 || { lab_say "machine $m: drbd up failed"; return 1; }
  done
  lab_run a "for _ in \$(seq 300); do $(drbdadm_lab cstate lab) | grep -q Connected && exit 0; sleep 0.1; done; exit 1" 60 ||
    { lab_say "DRBD did not connect"; return 1; }
  lab_run a "$(drbdadm_lab -- --clear-bitmap new-current-uuid lab) && $(drbdadm_lab primary lab) &&
for _ in \$(seq 300); do $(drbdadm_lab dstate lab) | grep -q UpToDate/UpToDate && exit 0; sleep 0.1; done; exit 1" 60 ||
    { lab_say "DRBD did not become UpToDate/UpToDate"; lab_run a "cat /proc/drbd"; return 1; }
}

drbd_flushes() {
  local m
  for m in a b; do
    drbd_conf "$1" >"$lab/$m/share/drbd.conf"
    lab_run "$m" "$(drbdadm_lab adjust lab)" 60 >/dev/null || return 1
  done
}

# Device cache flushes completed so far by the disk DEV of both machines (a+b; the block
# layer's stat file, field 16), to explain a row: a flush is the costly part of a durable write.
flush_count() {
  local m n=0 f
  for m in a b; do
    f=$(lab_run "$m" "awk '{ print \$16 }' /sys/block/$1/stat" 30) || f=0
    n=$((n + ${f:-0}))
  done
  echo "$n"
}

# fio_row BS DEPTH: "p50_us p99_us writes_per_s mb_per_s flushes_per_write" of random O_DIRECT +
# O_DSYNC writes on /dev/drbd0 for DRBD_SECONDS.
fio_row() {
  local bs=$1 depth=$2 f0 f1 row
  f0=$(flush_count vdb)
  lab_run a "fio --name=w --filename=/dev/drbd0 --rw=randwrite --bs=$bs --iodepth=$depth \\
  --ioengine=libaio --direct=1 --sync=1 --size=1G --time_based --runtime=$DRBD_SECONDS \\
  --lat_percentiles=1 --output-format=json --output=/run/lab/fio-$bs-$depth.json" \
    $((DRBD_SECONDS + 120)) >/dev/null || { echo "? ? ? ? ?"; return 0; }
  f1=$(flush_count vdb)
  row=$(jq -r '.jobs[0].write | [(.lat_ns.percentile["50.000000"] / 1000),
    (.lat_ns.percentile["99.000000"] / 1000), .iops, (.bw_bytes / 1e6), .total_ios]
    | map(. * 10 | round / 10) | @tsv' "$lab/a/share/fio-$bs-$depth.json")
  awk -v f=$((f1 - f0)) '{ printf "%s\t%s\t%s\t%s\t%.1f\n", $1, $2, $3, $4, ($5 > 0 ? f / $5 : 0) }' <<<"$row"
}

# The node is signalled by name: under TRACE_NODES the recorded pid is perf's, which ends once
# its node has (and has written its summary).
stop_backup() {
  lab_run b "pid=\$(cat /run/backup.pid) && pkill -TERM -x mirror
for _ in \$(seq 600); do kill -0 \$pid 2>/dev/null || exit 0; sleep 0.1; done; exit 1" 90 >/dev/null
}

# fresh_region MACHINE: no node files on MACHINE but a region of zeros, every block written once,
# as DRBD's backing disk is and a storage engine's file would be. (A region the node creates is
# preallocated: ext4 keeps such blocks "unwritten", and the checkpoint's fdatasync after the
# first write into each block commits the journal to convert it; a first lap's cost only.)
fresh_region() {
  lab_run "$1" "rm -rf /disk/mirror && mkdir -p /disk/mirror &&
dd if=/dev/zero of=/disk/mirror/region bs=1M count=$(( $(numfmt --from=iec "${REGION_SIZE%iB}") >> 20 )) conv=fsync status=none" 300 >/dev/null
}

# mirror_row BS DEPTH: the same figures from `mirror primary`'s done line, its workload running
# for DRBD_SECONDS on a fresh pair ($mode is the durability).
mirror_row() {
  local bs=$1 depth=$2 log=primary-$1-$2-$mode.log done_line k f0 f1
  fresh_region a
  fresh_region b
  f0=$(flush_count vda)
  start_backup
  # (perf trace takes seconds to start under emulation: the traced run gets them.)
  lab_run a "mkdir -p $(files_dir); setsid $(node_prefix a) $mirror primary $(node_args) \\
  --peer 10.78.0.2:$PORT --on-peer-loss block --write-size $bs --depth $depth --report-ms 0 \\
  >/run/lab/$log 2>&1 </dev/null &
pid=\$!; sleep $((DRBD_SECONDS + ${TRACE_NODES:+7} + 1)); pkill -TERM -x mirror
for _ in \$(seq 600); do kill -0 \$pid 2>/dev/null || exit 0; sleep 0.1; done; exit 1" \
    $((DRBD_SECONDS + 200)) >/dev/null
  stop_backup
  f1=$(flush_count vda)
  done_line=$(grep '^done' "$lab/a/share/$log" || true)
  if [ -z "$done_line" ]; then echo "? ? ? ? ?"; return 0; fi
  for k in p50_us p99_us writes_per_s mb_per_s; do
    printf '%s\t' "$(sed -n "s/.* $k=\([0-9.]*\).*/\1/p" <<<"$done_line")"
  done
  awk -v f=$((f1 - f0)) -v n="$(sed -n 's/^done writes=\([0-9]*\).*/\1/p' <<<"$done_line")" \
    'BEGIN { printf "%.1f\n", (n > 0 ? f / n : 0) }'
}

# Recovery. DRBD disconnects, 1 % of the 1 GiB device changes (random 4 KiB blocks, each once),
# it reconnects: the resync's time (from `connect` until UpToDate/UpToDate) and bytes (what it
# counts out of sync before it reconnects, /proc/drbd's oos, in KiB). libmirror: the backup
# stops, the primary writes as many random 4 KiB writes into a 1 GiB region, the backup returns:
# the catch-up's time (the primary's log: from the connection to "recovery complete") and bytes.
# Prints two lines: "drbd SECONDS BYTES", "libmirror SECONDS BYTES".
drbd_recovery() {
  local writes=2621 bs=4096 out
  out=$(lab_run a "$(drbdadm_lab disconnect lab) &&
fio --name=c --filename=/dev/drbd0 --rw=randwrite --bs=$bs --ioengine=libaio --iodepth=16 \\
  --direct=1 --size=1G --io_size=$((writes * bs)) --output=/dev/null || exit 1
oos=\$(sed -n 's/.* oos:\([0-9]*\).*/\1/p' /proc/drbd)
t0=\$(date +%s.%N)
$(drbdadm_lab connect lab)
sleep 0.1
for _ in \$(seq 6000); do
  $(drbdadm_lab cstate lab) | grep -q '^Connected' && $(drbdadm_lab dstate lab) | grep -q UpToDate/UpToDate && break
  sleep 0.02
done
t1=\$(date +%s.%N)
echo \"\$t0 \$t1 \$((oos * 1024))\"" 600) || out="0 0 ?"
  awk '{ printf "drbd %.3f %s\n", $2 - $1, $3 }' <<<"$(tail -1 <<<"$out")"

  local saved=$REGION_SIZE log
  REGION_SIZE=1GiB
  lab_run a "rm -rf /disk/mirror" 60 >/dev/null
  lab_run b "rm -rf /disk/mirror" 60 >/dev/null
  start_backup
  lab_run a "mkdir -p $(files_dir); $mirror primary $(node_args) --peer 10.78.0.2:$PORT \\
  --on-peer-loss block --write-size $bs --writes 100 --report-ms 0 >/run/lab/primary-rec-0.log 2>&1" \
    300 >/dev/null
  stop_backup
  lab_run a "$mirror primary $(node_args) --peer 10.78.0.2:$PORT --on-peer-loss continue \\
  --write-size $bs --depth 16 --writes $writes --start-id 10000000 --report-ms 0 \\
  >/run/lab/primary-rec-1.log 2>&1" 300 >/dev/null
  start_backup
  lab_run a "$mirror primary $(node_args) --peer 10.78.0.2:$PORT --on-peer-loss block \\
  --write-size $bs --writes 1 --start-id 20000000 --report-ms 0 >/run/lab/primary-rec-2.log 2>&1" \
    300 >/dev/null
  stop_backup
  REGION_SIZE=$saved
  log=$lab/a/share/primary-rec-2.log
  local t0 t1 bytes
  t0=$(grep -m1 'connected to backup' "$log" | cut -d' ' -f1)
  t1=$(grep -m1 'recovery complete' "$log" | cut -d' ' -f1)
  bytes=$(grep -m1 'recovery complete' "$log" | sed -n 's/.* bytes=\([0-9]*\).*/\1/p')
  if [ -n "$t0" ] && [ -n "$t1" ]; then
    awk -v a="$(date -d "$t0" +%s.%N)" -v b="$(date -d "$t1" +%s.%N)" -v n="${bytes:-?}" \
      'BEGIN { printf "libmirror %.3f %s\n", b - a, n }'
  else
    echo "libmirror ? ?"
  fi
}

# drbd_compare SIZES DEPTHS RECOVERY(0|1): the table, to target/lab/drbd.md and the summary.
drbd_compare() {
  local sizes=$1 depths=$2 recovery=$3
  local run_dir bs depth flushes d_row m_row ahead
  local table=$repo/target/lab/drbd.md
  mode=power transport=tcp primary_run=0 backup_run=0
  run_dir=$(mktemp -d "$repo/target/lab/drbd.XXXXXX")
  lab_init "$run_dir"
  LAB_DISK_SIZE=3G lab_machine a drbd
  LAB_DISK_SIZE=3G lab_machine b drbd
  lab_say "DRBD side by side: booting a and b"
  lab_boot a b
  drbd_up || { lab_halt; lab_say "kept $run_dir"; return 1; }
  {
    echo
    echo "| write | depth | DRBD flushes / our durability | DRBD p50 µs | p99 µs | writes/s | MB/s | flushes/write | libmirror p50 µs | p99 µs | writes/s | MB/s | flushes/write | libmirror ahead |"
    echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
  } | tee "$table"
  for flushes in yes no; do
    drbd_flushes "$flushes" || { lab_say "drbdadm adjust failed"; break; }
    mode=$([ "$flushes" = yes ] && echo power || echo process)
    for bs in $sizes; do
      for depth in $depths; do
        d_row=$(fio_row "$bs" "$depth")
        m_row=$(mirror_row "$bs" "$depth")
        # shellcheck disable=SC2086
        set -- $d_row $m_row
        ahead=$(awk -v dp50="$1" -v dp99="$2" -v dw="$3" -v mp50="$6" -v mp99="$7" -v mw="$8" 'BEGIN {
          if (mp50 == "?" || dp50 == "?") { print "?"; exit }
          behind = "";
          if (mp50 + 0 >= dp50 + 0) behind = behind " p50";
          if (mp99 + 0 >= dp99 + 0) behind = behind " p99";
          if (mw + 0 <= dw + 0) behind = behind " throughput";
          print (behind == "") ? "yes" : "no (" substr(behind, 2) ")" }')
        printf '| %s B | %s | %s / %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' "$bs" "$depth" \
          "$([ "$flushes" = yes ] && echo on || echo off)" "$mode" "$@" "$ahead" | tee -a "$table"
      done
    done
  done
  if [ "$recovery" = 1 ]; then
    drbd_flushes yes || true
    mode=process
    local rec
    rec=$(drbd_recovery)
    {
      echo
      echo "| after 1 % of 1 GiB changed while disconnected (2621 random 4 KiB writes) | resync / catch-up time (s) | bytes moved |"
      echo "| --- | --- | --- |"
      awk '{ printf "| %s | %s | %s |\n", ($1 == "drbd" ? "DRBD resync" : "libmirror catch-up"), $2, $3 }' <<<"$rec"
    } | tee -a "$table"
  fi
  cat "$table" >>"$repo/target/lab/summary.txt"
  lab_halt
  lab_clean "$run_dir"
}

# profile_row BS DEPTH: why a row is what it is. The row's libmirror workload (mirror_row) runs
# twice on a fresh pair: once under `perf record -a -g` on both machines (where each machine's
# one CPU goes: by command, by object, by symbol), once under `perf trace -s` on both nodes
# (each system call's count and mean time, the waits a CPU profile does not show: fdatasync,
# poll). Writes target/lab/profile-$mode-BS-DEPTH.txt; prints its path.
profile_row() {
  local bs=$1 depth=$2 m row out=$repo/target/lab/profile-$mode-$1-$2.txt
  local secs=$((DRBD_SECONDS + 300))
  {
    echo "# libmirror, $bs B writes, depth $depth, durability $mode, ${DRBD_SECONDS} s per pass"
    echo "# (ci/lab/lab.sh profile; one emulated CPU per machine; a = primary, b = backup)"
  } >"$out"
  # perf takes seconds to start under full emulation: the workload starts once both record.
  for m in a b; do
    lab_run "$m" "rm -f /tmp/perf.data; setsid perf record -F 499 -a -g -o /tmp/perf.data -- sleep $secs \\
  >/run/lab/perf-record.log 2>&1 </dev/null & echo \$! >/run/perf.pid" 30 >/dev/null
  done
  for m in a b; do
    wait_for "$lab/$m/share/perf-record.log" 120 "perf record on $m" lab_run "$m" "test -s /tmp/perf.data" 30 ||
      return 1
  done
  sleep 3
  row=$(mirror_row "$bs" "$depth")
  {
    echo "# pass 1 (perf record): p50 p99 writes/s MB/s flushes/write: $row"
    echo "# pass 1: $(grep '^done' "$lab/a/share/primary-$bs-$depth-$mode.log" || echo 'no done line')"
    echo "# (a symbol's CPU ms per write = its % x the machine's samples / 499 Hz / writes)"
  } >>"$out"
  for m in a b; do
    lab_run "$m" "pid=\$(cat /run/perf.pid); kill -INT \$pid 2>/dev/null; while kill -0 \$pid 2>/dev/null; do sleep 0.5; done
echo \"## machine $m: \$(perf report -i /tmp/perf.data --stdio --sort comm 2>/dev/null | grep -m1 '^# Samples')\"
echo '## machine $m: CPU by command'
perf report -i /tmp/perf.data --stdio --no-children --sort comm -g none --percent-limit 1 2>/dev/null | grep -v '^#' | grep -v '^\$' | head -12
echo '## machine $m: CPU by command and object'
perf report -i /tmp/perf.data --stdio --no-children --sort comm,dso -g none --percent-limit 1 2>/dev/null | grep -v '^#' | grep -v '^\$' | head -20
echo '## machine $m: CPU by symbol (top 40)'
perf report -i /tmp/perf.data --stdio --no-children --sort comm,sym -g none --percent-limit 0.5 2>/dev/null | grep -v '^#' | grep -v '^\$' | head -40" \
      $((secs + 600)) >>"$out" 2>&1 || echo "(machine $m: perf report failed)" >>"$out"
  done
  # Pass 2: each node runs under `perf trace -s` (its threads too, those it starts later).
  row=$(TRACE_NODES=1 mirror_row "$bs" "$depth")
  {
    echo "# pass 2 (perf trace -s on the nodes): p50 p99 writes/s MB/s flushes/write: $row"
    echo "# pass 2: $(grep '^done' "$lab/a/share/primary-$bs-$depth-$mode.log" || echo 'no done line')"
    for m in a b; do
      echo "## machine $m: system calls of its node, per thread: calls, errors, total, min, avg, max ms"
      # Each thread's heading and its eight costliest calls (perf lists them by total time).
      awk '/\([0-9]+\), [0-9]+ events/ { print; n = 0; next }
        /^ +[a-z_0-9]+ +[0-9]+ +[0-9]+ +[0-9.]+/ && n < 8 { print; n++ }' "$lab/$m/share/trace-$m.txt" ||
        echo "(no trace)"
    done
  } >>"$out"
  echo "$out"
}
