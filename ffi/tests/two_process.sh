#!/usr/bin/env bash
# Two-process crash test of the C API: a backup process and a primary process (ffi/tests/node.c,
# through libmirror's C API) on loopback. Under load, SIGKILL the backup and the primary in turn,
# restart each, then stop both cleanly and check from outside that
#   - the two region files are byte-identical (cmp), and
#   - every write the primary saw complete is in both regions (that write or a later one in its
#     slot), with no torn or foreign slot (`mirror check-workload`, the Rust checker of the same
#     workload format).
#
# usage: two_process.sh NODE_BIN MIRROR_BIN POLICY ROUNDS
# Ends with the line "two_process: N passed, N failed"; exits non-zero on any failure. The work
# directory (files and node logs) is kept on failure, or always with MIRROR_KEEP_WORK=1.
set -euo pipefail

node=$1
mirror_bin=$2
policy=$3
rounds=$4

work=$(mktemp -d /tmp/mirror-ffi-2p-XXXXXX)
backup_pid=""
primary_pid=""
port=0
test_name=two_process
logs=("$work/primary.log" "$work/backup.log")
kill_nodes() {
  local pid
  for pid in $backup_pid $primary_pid; do
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
}
# shellcheck source=ffi/tests/harness.sh
source "$(dirname "$0")/harness.sh"

export MIRROR_LOG=${MIRROR_LOG:-info}

start_backup() {
  "$node" backup "$work" "$port" "$work/port" >>"$work/backup.log" 2>&1 &
  backup_pid=$!
}

start_primary() { # start_primary FIRST_ID
  "$node" primary "$work" "$port" "$work/completions" "$1" "$policy" >>"$work/primary.log" 2>&1 &
  primary_pid=$!
}

# Waits until the primary completed `need` more writes (both nodes must stay up).
wait_progress() {
  local need=$1 before deadline
  before=$(completed)
  deadline=$((SECONDS + 30))
  while [ "$(completed)" -lt $((before + need)) ]; do
    alive "$backup_pid" || fail "backup exited unexpectedly"
    alive "$primary_pid" || fail "primary exited unexpectedly"
    [ "$SECONDS" -lt "$deadline" ] || fail "no progress for 30 s (completed $(completed))"
    sleep 0.02
  done
}

stop_cleanly() { stop_process "$1" "$2"; } # stop_cleanly PID NAME

# --- the run ---------------------------------------------------------------------------------
start_backup
for _ in $(seq 1 500); do [ -s "$work/port" ] && break; sleep 0.01; done
[ -s "$work/port" ] || fail "backup did not publish its port"
port=$(cat "$work/port")
start_primary 0
kills_backup=0
kills_primary=0
for round in $(seq 1 "$rounds"); do
  wait_progress 200
  nap 200
  if [ $((round % 2)) -eq 1 ]; then
    kill -KILL "$backup_pid"
    wait "$backup_pid" 2>/dev/null || true
    kills_backup=$((kills_backup + 1))
    nap 100
    start_backup
  else
    kill -KILL "$primary_pid"
    wait "$primary_pid" 2>/dev/null || true
    kills_primary=$((kills_primary + 1))
    # A fresh id range: ids only grow over the run, as the check expects.
    start_primary $((round * 1000000000))
  fi
done
wait_progress 200

# Stop the primary (it drains and waits to be synchronous), then let the backup apply all of it.
stop_cleanly "$primary_pid" primary
primary_pid=""
last_seq=$(( $(status_field "$work/primary.queue" next_seq) - 1 ))
deadline=$((SECONDS + 30))
until [ "$(status_field "$work/backup.queue" applied_through)" -ge "$last_seq" ]; do
  [ "$SECONDS" -lt "$deadline" ] || fail "backup did not apply through seq $last_seq"
  sleep 0.05
done
stop_cleanly "$backup_pid" backup
backup_pid=""

n=$(completed)
echo "two_process ($policy): $kills_backup backup kills, $kills_primary primary kills, $n completed writes, last seq $last_seq"
check "both roles were killed" test "$kills_backup" -gt 0 -a "$kills_primary" -gt 0
check "writes completed" test "$n" -gt $((rounds * 200))
check "regions are byte-identical" cmp "$work/primary.region" "$work/backup.region"
check "every completed write is in the primary's region" \
  "$mirror_bin" check-workload "$work/primary.region" --completions "$work/completions" --seed 1 --write-size 64
check "every completed write is in the backup's region" \
  "$mirror_bin" check-workload "$work/backup.region" --completions "$work/completions" --seed 1 --write-size 64
finish
[ "$failed" -eq 0 ]
