#!/usr/bin/env bash
# Failover under load through the C API: two node processes (ffi/tests/node.c `failover`), each
# able to take either role, on loopback under `on_peer_loss = block`. Each round SIGKILLs the
# current primary at a random moment, promotes the backup (odd rounds: SIGUSR1, the node calls
# mirror_promote; even rounds: `mirror promote`, through the node's control socket), restarts
# the old primary as a backup (it rejoins: its divergent suffix is repaired, it catches up) and
# waits for writes to flow again. Then both stop cleanly and the check runs from outside:
#   - the two region files are byte-identical (cmp), and
#   - every write that ever completed, on either primary, is in both regions (that write or a
#     later one in its slot), with no torn or foreign slot (`mirror check-workload`).
#
# usage: failover.sh NODE_BIN MIRROR_BIN ROUNDS
# Ends with the line "failover: N passed, N failed"; exits non-zero on any failure. The work
# directory is kept on failure, or always with MIRROR_KEEP_WORK=1.
set -euo pipefail

node=$1
mirror_bin=$2
rounds=$3

work=$(mktemp -d /tmp/mirror-ffi-failover-XXXXXX)
declare -A pid port
test_name=failover
logs=("$work/a.log" "$work/b.log" "$work/promote.log")
kill_nodes() {
  local n
  for n in a b; do
    if [ -n "${pid[$n]:-}" ]; then
      kill -KILL "${pid[$n]}" 2>/dev/null || true
      wait "${pid[$n]}" 2>/dev/null || true
    fi
  done
}
# shellcheck source=ffi/tests/harness.sh
source "$(dirname "$0")/harness.sh"

export MIRROR_LOG=${MIRROR_LOG:-info}

# A loopback port nobody listens on (the nodes need each other's ports before they start).
free_port() {
  local p
  while :; do
    p=$((20000 + RANDOM % 40000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
      echo "$p"
      return
    fi
  done
}
port[a]=$(free_port)
port[b]=$(free_port)
while [ "${port[b]}" = "${port[a]}" ]; do port[b]=$(free_port); done

other() { if [ "$1" = a ]; then echo b; else echo a; fi; }

start() { # start NAME ROLE
  local name=$1 peer
  peer=$(other "$name")
  "$node" failover "$name" "$work" "${port[$name]}" "${port[$peer]}" "$work/completions" "$2" \
    >>"$work/$name.log" 2>&1 &
  pid[$name]=$!
}

wait_progress() { # wait_progress N: N more completed writes, both nodes up
  local need=$1 before deadline
  before=$(completed)
  deadline=$((SECONDS + 60))
  while [ "$(completed)" -lt $((before + need)) ]; do
    alive "${pid[a]}" || fail "a exited unexpectedly"
    alive "${pid[b]}" || fail "b exited unexpectedly"
    [ "$SECONDS" -lt "$deadline" ] || fail "no progress for 60 s (completed $(completed))"
    sleep 0.02
  done
}

stop_cleanly() { # stop_cleanly NAME
  stop_process "${pid[$1]}" "$1"
  pid[$1]=""
}

# --- the run ---------------------------------------------------------------------------------
start b backup
start a primary
primary=a
wait_progress 100
cli_promotions=0
api_promotions=0
for round in $(seq 1 "$rounds"); do
  nap 300
  backup=$(other "$primary")
  kill -KILL "${pid[$primary]}"
  wait "${pid[$primary]}" 2>/dev/null || true
  if [ $((round % 2)) -eq 1 ]; then
    kill -USR1 "${pid[$backup]}"
    api_promotions=$((api_promotions + 1))
  else
    # Refused ("connected to a live primary") until the backup sees the old primary gone.
    deadline=$((SECONDS + 30))
    until "$mirror_bin" promote "$work/$backup.queue" >>"$work/promote.log" 2>&1; do
      [ "$SECONDS" -lt "$deadline" ] || fail "mirror promote kept failing (see promote.log)"
      sleep 0.01
    done
    cli_promotions=$((cli_promotions + 1))
  fi
  start "$primary" backup
  primary=$backup
  wait_progress 100
done

# Stop the primary (it drains and waits to be synchronous), then let the backup apply all of it.
backup=$(other "$primary")
stop_cleanly "$primary"
last_seq=$(( $(status_field "$work/$primary.queue" next_seq) - 1 ))
deadline=$((SECONDS + 30))
until [ "$(status_field "$work/$backup.queue" applied_through)" -ge "$last_seq" ]; do
  [ "$SECONDS" -lt "$deadline" ] || fail "backup did not apply through seq $last_seq"
  sleep 0.05
done
stop_cleanly "$backup"

n=$(completed)
echo "failover: $rounds rounds ($api_promotions through mirror_promote, $cli_promotions through mirror promote), $n completed writes, last seq $last_seq"
check "every round promoted" test $((api_promotions + cli_promotions)) -eq "$rounds"
check "regions are byte-identical" cmp "$work/a.region" "$work/b.region"
for name in a b; do
  check "every completed write is in $name's region" \
    "$mirror_bin" check-workload "$work/$name.region" --completions "$work/completions" --seed 1 --write-size 64
done
finish
[ "$failed" -eq 0 ]
