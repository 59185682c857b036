#!/usr/bin/env bash
# The C API gate (docs/FFI.md), one step of ci/test.sh; runs the same way by hand:
#   1. include/mirror.h is exactly what the pinned cbindgen generates, and every export is inside
#      the panic boundary (tests/header_drift.rs);
#   2. the header compiles alone as C99 and C++17 with -pedantic;
#   3. ffi/tests/api_test.c (every function, every error path) under AddressSanitizer + UBSan
#      (shared library), then under valgrind (static library) with no definite/indirect leak;
#   4. the two-process C test: a backup and a primary process through the C API, SIGKILL of each
#      in turn under load, both peer-loss policies, then byte-identical regions and every
#      completed write on both nodes; then 20 rounds of failover under load (SIGKILL the
#      primary, promote the backup through mirror_promote or `mirror promote`, restart the old
#      primary as a backup), with the same checks;
#   5. ci/install.sh into a temporary prefix, then the example (ffi/examples/kvlog.c) and the
#      C++17 test built with pkg-config exactly as an integrator would, and run; kvlog's
#      ADDR:PORT forms and KVLOG_SET (an override that wins, refused keys with their message);
#   6. the same for the rdma build (FEATURES=rdma ci/install.sh, target/rdma): kvlog linked shared
#      and statically with mirror.pc's static_libs (-libverbs ...), run over TCP on loopback (no
#      RDMA device needed).
# Sanitizers and valgrind run without suppressions.
set -euo pipefail
cd "$(dirname "$0")/.."
MIRROR_TEST_TOOLS=1 source ci/setup.sh
start=$(date +%s)
part() { printf '\n--- C API: %s (%ss)\n' "$*" "$(($(date +%s) - start))"; }

need_apt=()
command -v valgrind >/dev/null 2>&1 || need_apt+=(valgrind)
command -v g++ >/dev/null 2>&1 || need_apt+=(g++)
command -v pkg-config >/dev/null 2>&1 || need_apt+=(pkg-config)
command -v make >/dev/null 2>&1 || need_apt+=(make)
command -v cmp >/dev/null 2>&1 || need_apt+=(diffutils)
command -v readelf >/dev/null 2>&1 || need_apt+=(binutils)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "ci/ffi-test.sh: installing ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi

tmp=$(mktemp -d /tmp/mirror-ffi-ci-XXXXXX)
kv_backup_pid=""
cleanup() {
  if [ -n "$kv_backup_pid" ]; then
    kill -KILL "$kv_backup_pid" 2>/dev/null || true
    wait "$kv_backup_pid" 2>/dev/null || true
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT

part "header drift (pinned cbindgen 0.29.4) and export conventions"
# The features and packages of the main test build (ci/test.sh), which then builds nothing again.
cargo test --workspace --features fail-points --test header_drift

part "the header alone compiles as C99 and as C++17 (-pedantic -Werror)"
cc -std=c99 -pedantic -Wall -Wextra -Werror -fsyntax-only -x c include/mirror.h
g++ -std=c++17 -pedantic -Wall -Wextra -Werror -fsyntax-only -x c++ include/mirror.h

part "build the library (release) and the mirror CLI"
cargo build --release --lib --bin mirror
target_dir=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
release=${target_dir:-$PWD/target}/release

part "build the C tests (-Wall -Wextra -Werror)"
make -C ffi LIBDIR="$release" all

part "C API test under AddressSanitizer + UBSan (shared library)"
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:detect_stack_use_after_return=1:strict_string_checks=1 \
  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  ffi/build/api_test_asan

part "C API test under valgrind (static library, no sanitizers)"
vg_status=0
valgrind --leak-check=full --errors-for-leak-kinds=definite,indirect \
  --show-leak-kinds=definite,indirect --error-exitcode=1 \
  ffi/build/api_test_static 2>"$tmp/valgrind.log" || vg_status=$?
grep -E "ERROR SUMMARY|definitely lost|indirectly lost|possibly lost|still reachable|All heap blocks" \
  "$tmp/valgrind.log" || true
if [ "$vg_status" -ne 0 ]; then
  cat "$tmp/valgrind.log"
  echo "ci/ffi-test.sh: valgrind reported errors or leaks (status $vg_status)" >&2
  exit 1
fi

part "two-process C test: SIGKILL each node in turn under load (on_peer_loss=continue, then block)"
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  bash ffi/tests/two_process.sh ffi/build/node "$release/mirror" continue 12
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  bash ffi/tests/two_process.sh ffi/build/node "$release/mirror" block 12

part "failover under load: 20 rounds of SIGKILL the primary, promote the backup, rejoin the old primary"
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  bash ffi/tests/failover.sh ffi/build/node "$release/mirror" 20

part "install (ci/install.sh) into a temporary prefix; build against it with pkg-config"
prefix=$tmp/prefix
PREFIX=$prefix bash ci/install.sh
export PKG_CONFIG_PATH=$prefix/lib/pkgconfig
readelf -d "$prefix/lib/libmirror.so" | grep -q 'SONAME.*\[libmirror\.so\.0\]' \
  || { echo "libmirror.so lacks SONAME libmirror.so.0" >&2; exit 1; }
bin=$tmp/bin
mkdir -p "$bin"
# Exactly the documented commands (docs/FFI.md).
cc -std=c11 -Wall -Wextra -Werror -O2 -o "$bin/kvlog" ffi/examples/kvlog.c $(pkg-config --cflags --libs mirror)
cc -std=c11 -Wall -Wextra -Werror -O2 -o "$bin/kvlog_static" ffi/examples/kvlog.c \
  $(pkg-config --cflags mirror) "$(pkg-config --variable=libdir mirror)/libmirror.a" \
  $(pkg-config --variable=static_libs mirror)
g++ -std=c++17 -Wall -Wextra -Werror -o "$bin/cxx_header" ffi/tests/cxx_header.cpp $(pkg-config --cflags --libs mirror)
readelf -d "$bin/kvlog" | grep -q 'NEEDED.*\[libmirror\.so\.0\]' \
  || { echo "kvlog does not load libmirror.so.0" >&2; exit 1; }
if readelf -d "$bin/kvlog_static" | grep -q 'NEEDED.*libmirror'; then
  echo "kvlog_static should not need libmirror.so" >&2
  exit 1
fi
export LD_LIBRARY_PATH=$prefix/lib

part "CMake: find the install through pkg-config (ffi/examples/cmake) and build the example"
cmake -S ffi/examples/cmake -B "$tmp/cmake-build" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$tmp/cmake-build" >/dev/null
readelf -d "$tmp/cmake-build/kvlog" | grep -q 'NEEDED.*\[libmirror\.so\.0\]' \
  || { echo "the CMake-built kvlog does not load libmirror.so.0" >&2; exit 1; }

part "C++17 test"
"$bin/cxx_header"

part "example: kvlog put on the primary, read back from the backup's region file"
kv=$tmp/kv
mkdir -p "$kv/backup" "$kv/primary"
"$bin/kvlog" backup "$kv/backup" 0 >"$kv/backup.out" 2>&1 &
kv_backup_pid=$!
for _ in $(seq 1 500); do grep -q listening "$kv/backup.out" && break; sleep 0.01; done
port=$(sed -n 's/.*listening on 127\.0\.0\.1:\([0-9]*\).*/\1/p' "$kv/backup.out")
[ -n "$port" ] || { cat "$kv/backup.out"; echo "kvlog backup did not start" >&2; exit 1; }
ex_passed=0
ex_check() { # ex_check DESCRIPTION COMMAND...
  local what=$1
  shift
  if "$@"; then ex_passed=$((ex_passed + 1)); else
    echo "example: check failed: $what" >&2
    echo "example: $ex_passed passed, 1 failed"
    exit 1
  fi
}
"$bin/kvlog" put "$kv/primary" "$port" greeting hello
"$bin/kvlog" put "$kv/primary" "$port" color blue
"$bin/kvlog_static" put "$kv/primary" "$port" greeting bonjour
"$tmp/cmake-build/kvlog" put "$kv/primary" "$port" shape round
backup_has() { # the backup applies right after acknowledging: allow it a moment
  for _ in $(seq 1 200); do
    [ "$("$bin/kvlog" get "$kv/backup" "$1" 2>/dev/null)" = "$2" ] && return 0
    sleep 0.01
  done
  return 1
}
ex_check "the backup's region file holds the latest greeting" backup_has greeting bonjour
ex_check "the backup's region file holds color" backup_has color blue
ex_check "the primary's region file holds the latest greeting" \
  test "$("$bin/kvlog" get "$kv/primary" greeting)" = bonjour
kill -TERM "$kv_backup_pid"
kv_status=0
wait "$kv_backup_pid" || kv_status=$?
kv_backup_pid=""
ex_check "the backup stops cleanly on SIGTERM" test "$kv_status" -eq 0
ex_check "both region files are byte-identical" cmp "$kv/primary/kv.region" "$kv/backup/kv.region"
ex_check "the backup holds what the CMake-built program put" backup_has shape round
ex_check "the backup lists four entries" test "$("$bin/kvlog" list "$kv/backup" | wc -l)" -eq 4
echo "example: $ex_passed passed, 0 failed"

part "example: kvlog's [ADDR:]PORT and [HOST:]PEER_PORT forms and KVLOG_SET"
# The forms a two-machine pair uses, on loopback: an explicit listen address, a HOST:PORT peer,
# extra keys from KVLOG_SET (applied after kvlog's own, so they win), and a refused key or value
# reported with the library's message.
kx=$tmp/kv-forms
mkdir -p "$kx/backup" "$kx/primary"
KVLOG_SET="durability=power" "$bin/kvlog" backup "$kx/backup" 127.0.0.1:0 >"$kx/backup.out" 2>&1 &
kv_backup_pid=$!
for _ in $(seq 1 500); do grep -q listening "$kx/backup.out" && break; sleep 0.01; done
port=$(sed -n 's/.*listening on 127\.0\.0\.1:\([0-9]*\).*/\1/p' "$kx/backup.out")
[ -n "$port" ] || { cat "$kx/backup.out"; echo "kvlog backup 127.0.0.1:0 did not start" >&2; exit 1; }
ex_passed=0
ex_check "a put to 127.0.0.1:PORT with KVLOG_SET=durability=power" \
  env KVLOG_SET="durability=power" "$bin/kvlog" put "$kx/primary" "127.0.0.1:$port" greeting hello
# Nothing listens on port 1: this put completes only if KVLOG_SET's peer wins over the argument.
ex_check "KVLOG_SET overrides kvlog's own peer" \
  env KVLOG_SET=" peer=127.0.0.1:$port  durability=power " "$bin/kvlog" put "$kx/primary" 127.0.0.1:1 color blue
refused() { # refused EXPECTED_STATUS TEXT_IN_STDERR KVLOG_SET: a put that must fail, saying TEXT
  local status=0
  KVLOG_SET=$3 "$bin/kvlog" put "$kx/primary" "127.0.0.1:$port" shape round 2>"$kx/refused.err" || status=$?
  [ "$status" -eq "$1" ] && grep -qF -- "$2" "$kx/refused.err" && return 0
  echo "KVLOG_SET=\"$3\": status $status, stderr:" >&2
  cat "$kx/refused.err" >&2
  return 1
}
ex_check "an unknown key in KVLOG_SET fails with the library's message" \
  refused 1 "unknown config key 'no_such_key'" "durability=power no_such_key=1"
ex_check "a bad value in KVLOG_SET fails with the library's message" \
  refused 1 "config key 'durability' has bad value 'sometimes'" "durability=sometimes"
ex_check "a KVLOG_SET word without '=' is refused" refused 2 "is not KEY=VALUE" "durability"
kx_backup_has() {
  for _ in $(seq 1 200); do
    [ "$("$bin/kvlog" get "$kx/backup" "$1" 2>/dev/null)" = "$2" ] && return 0
    sleep 0.01
  done
  return 1
}
ex_check "the backup holds the put to 127.0.0.1:PORT" kx_backup_has greeting hello
ex_check "the backup holds the put whose peer KVLOG_SET overrode" kx_backup_has color blue
ex_check "the refused puts wrote nothing" test "$("$bin/kvlog" list "$kx/primary" | wc -l)" -eq 2
kill -TERM "$kv_backup_pid"
kv_status=0
wait "$kv_backup_pid" || kv_status=$?
kv_backup_pid=""
ex_check "the backup stops cleanly on SIGTERM" test "$kv_status" -eq 0
ex_check "both region files are byte-identical" cmp "$kx/primary/kv.region" "$kx/backup/kv.region"
echo "example (forms): $ex_passed passed, 0 failed"

part "the rdma build: installed (FEATURES=rdma), kvlog linked shared and static, run over TCP"
# Its own prefix and target directory (target/rdma, shared with ci/softroce-test.sh).
rprefix=$tmp/prefix-rdma
FEATURES=rdma PREFIX=$rprefix bash ci/install.sh
export PKG_CONFIG_PATH=$rprefix/lib/pkgconfig LD_LIBRARY_PATH=$rprefix/lib
[ "$(pkg-config --variable=features mirror)" = rdma ] \
  || { echo "the rdma install's mirror.pc does not say features=rdma" >&2; exit 1; }
for flags in "--variable=static_libs" "--libs --static"; do
  case " $(pkg-config $flags mirror) " in
    *" -libverbs "*) ;;
    *) echo "pkg-config $flags mirror lacks -libverbs (a static link fails on ibv_*)" >&2; exit 1 ;;
  esac
done
readelf -d "$rprefix/lib/libmirror.so" | grep -q 'NEEDED.*\[libibverbs\.so\.1\]' \
  || { echo "the rdma libmirror.so does not load libibverbs.so.1" >&2; exit 1; }
cc -std=c11 -Wall -Wextra -Werror -O2 -o "$bin/kvlog_rdma" ffi/examples/kvlog.c $(pkg-config --cflags --libs mirror)
cc -std=c11 -Wall -Wextra -Werror -O2 -o "$bin/kvlog_rdma_static" ffi/examples/kvlog.c \
  $(pkg-config --cflags mirror) "$(pkg-config --variable=libdir mirror)/libmirror.a" \
  $(pkg-config --variable=static_libs mirror)
readelf -d "$bin/kvlog_rdma" | grep -q 'NEEDED.*\[libmirror\.so\.0\]' \
  || { echo "kvlog_rdma does not load libmirror.so.0" >&2; exit 1; }
readelf -d "$bin/kvlog_rdma_static" | grep -q 'NEEDED.*\[libibverbs\.so\.1\]' \
  || { echo "kvlog_rdma_static does not load libibverbs.so.1" >&2; exit 1; }
if readelf -d "$bin/kvlog_rdma_static" | grep -q 'NEEDED.*libmirror'; then
  echo "kvlog_rdma_static should not need libmirror.so" >&2
  exit 1
fi
rkv=$tmp/kv-rdma
mkdir -p "$rkv/backup" "$rkv/primary"
"$bin/kvlog_rdma_static" backup "$rkv/backup" 0 >"$rkv/backup.out" 2>&1 &
kv_backup_pid=$!
for _ in $(seq 1 500); do grep -q listening "$rkv/backup.out" && break; sleep 0.01; done
port=$(sed -n 's/.*listening on 127\.0\.0\.1:\([0-9]*\).*/\1/p' "$rkv/backup.out")
[ -n "$port" ] || { cat "$rkv/backup.out"; echo "the rdma kvlog backup did not start" >&2; exit 1; }
"$bin/kvlog_rdma" put "$rkv/primary" "$port" greeting hello
"$bin/kvlog_rdma_static" put "$rkv/primary" "$port" greeting salut
rdma_backup_has() {
  for _ in $(seq 1 200); do
    [ "$("$bin/kvlog_rdma" get "$rkv/backup" "$1" 2>/dev/null)" = "$2" ] && return 0
    sleep 0.01
  done
  return 1
}
ex_passed=0
ex_check "the rdma build's backup holds the latest greeting" rdma_backup_has greeting salut
kill -TERM "$kv_backup_pid"
kv_status=0
wait "$kv_backup_pid" || kv_status=$?
kv_backup_pid=""
ex_check "the rdma build's backup stops cleanly on SIGTERM" test "$kv_status" -eq 0
ex_check "both region files are byte-identical" cmp "$rkv/primary/kv.region" "$rkv/backup/kv.region"
echo "example (rdma build): $ex_passed passed, 0 failed"

part "C API gate passed"
