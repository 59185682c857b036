#!/usr/bin/env bash
# The whole test suite. `.ci/run` runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
MIRROR_TEST_TOOLS=1 source ci/setup.sh
start=$(date +%s)
step() { printf '\n=== %s (%ss)\n' "$*" "$(( $(date +%s) - start ))"; }

step "format"
cargo fmt --all -- --check

step "clippy"
cargo clippy --workspace --all-targets -- -D warnings
# The test fail points (never in a release build) are code too.
# So are the round-trip stamps (src/stamps.rs), measurement only.
cargo clippy --workspace --all-targets --features fail-points,stamps -- -D warnings

step "unit, property and integration tests"
if command -v cargo-nextest >/dev/null 2>&1 || cargo nextest --version >/dev/null 2>&1; then
  # fail-points: the kill campaigns kill the primary between an ack and its apply.
  cargo nextest run --workspace --no-fail-fast --features fail-points
  # nextest does not run doctests
  cargo test --workspace --doc
else
  cargo test --workspace --no-fail-fast --features fail-points
fi

step "loom model checking of the submission ring and its doorbell"
RUSTFLAGS="--cfg loom" cargo test -p mirror-ring --release --target-dir target/loom --test loom

step "C API: header drift, C tests (ASan/UBSan, valgrind), two-process C test, C++17"
bash ci/ffi-test.sh

step "fuzz smoke: wire decoder, queue recovery scan, protocol operations vs a model"
bash ci/fuzz-smoke.sh

step "RDMA verbs over soft-RoCE in an emulated guest"
bash ci/softroce-test.sh

step "two-machine lab: power cuts (power, pmem, the process control), RDMA across kernels, DRBD"
bash ci/lab/lab.sh ci

step "demo smoke (the README's main command, shortened)"
bash ci/demo.sh --writes 2000

step "benchmark smoke (each criterion bench once; mirror bench, small; never timed assertions)"
# Criterion runs each benchmark once when started without `--bench`, as `cargo test` starts it:
# the test build of the step above, not a second (optimized) build of every dependency.
cargo test --workspace --features fail-points --bench ring --bench engine --bench payload --bench batch
cc -O2 -Wall -Wextra -Werror -o target/pingpong benches/pingpong.c
./target/release/mirror bench --iterations 500 --sizes 64,4096 --pipelined-writes 2000 \
  --recovery-regions 16MiB --recovery-missed 0.01 --failover-rounds 3 --failover-region 16MiB \
  --security-iterations 500 --resync-region 16MiB --reference target/pingpong \
  --c-api-iterations 500 --power-writes 2000 --power-trials 1 --json > target/bench-smoke.json
grep -q '"sync_latency"' target/bench-smoke.json
grep -q '"floor_vs_reference_p50"' target/bench-smoke.json
grep -q '"sync_latency_medians"' target/bench-smoke.json
grep -q '"c_api"' target/bench-smoke.json
grep -q '"targets"' target/bench-smoke.json
grep -q '"failover"' target/bench-smoke.json
grep -q '"tls+secret"' target/bench-smoke.json
grep -q '"initial_sync_vs_tcp"' target/bench-smoke.json
grep -q '"resync_vs_tcp"' target/bench-smoke.json
grep -q '"floor_two_writers_per_s"' target/bench-smoke.json
grep -q '"engine_disk_mb_per_s"' target/bench-smoke.json
grep -q '"crc_pass"' target/bench-smoke.json
grep -q '"machine"' target/bench-smoke.json

step "all passed"
