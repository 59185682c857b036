# The shell harness of the C API's process tests (two_process.sh, failover.sh), sourced by them.
# Before sourcing, set `test_name` (the prefix of every report line), `work` (the work
# directory), `mirror_bin` and `logs` (the node log files shown when a run fails); define
# `kill_nodes`, which kills every node process still running. It keeps the counters `passed` and `failed`, and on exit kills the
# nodes, then keeps the work directory (and prints the logs' tails) on failure or with
# MIRROR_KEEP_WORK=1, or removes it.

passed=0
failed=0

finish() { echo "$test_name: $passed passed, $failed failed"; }

cleanup() {
  local rc=$?
  kill_nodes
  if [ "$rc" -ne 0 ] || [ "$failed" -ne 0 ] || [ -n "${MIRROR_KEEP_WORK:-}" ]; then
    local log
    for log in "${logs[@]}"; do
      echo "--- $(basename "$log") (tail) ---"
      tail -n 30 "$log" 2>/dev/null || true
    done
    echo "(kept $work)"
  else
    rm -rf "$work"
  fi
}
trap cleanup EXIT

fail() {
  echo "$test_name: FAILED: $*" >&2
  failed=$((failed + 1))
  finish
  exit 1
}

check() { # check DESCRIPTION COMMAND...
  local what=$1
  shift
  if "$@"; then
    passed=$((passed + 1))
  else
    echo "$test_name: check failed: $what" >&2
    failed=$((failed + 1))
  fi
}

alive() { kill -0 "$1" 2>/dev/null; }

# A random sleep of 0..$1 milliseconds.
nap() { sleep "$(printf '0.%03d' $((RANDOM % $1)))"; }

# SIGTERM and wait for a clean exit (status 0) within 60 s.
stop_process() { # stop_process PID WHAT
  kill -TERM "$1"
  local deadline=$((SECONDS + 60)) st=0
  while alive "$1"; do
    [ "$SECONDS" -lt "$deadline" ] || fail "$2 did not stop within 60 s"
    sleep 0.05
  done
  wait "$1" || st=$?
  [ "$st" -eq 0 ] || fail "$2 exited with status $st"
}

# A number from `mirror status QUEUE` (e.g. next_seq, applied_through).
status_field() { # status_field QUEUE FIELD
  "$mirror_bin" status "$1" | awk -v f="$2" '$1 == f { print $2 }'
}

completed() {
  if [ -f "$work/completions" ]; then wc -l <"$work/completions"; else echo 0; fi
}
