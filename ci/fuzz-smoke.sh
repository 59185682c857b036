#!/usr/bin/env bash
# A short smoke of every cargo-fuzz (libFuzzer) target, starting from the committed corpora.
# Longer campaigns: FUZZ_SECONDS=3600 bash ci/fuzz-smoke.sh
# These machines have no nightly toolchain: RUSTC_BOOTSTRAP=1 lets stable rustc accept the
# sanitizer flags cargo-fuzz passes (the toolchain is the same compiler).
set -euo pipefail
cd "$(dirname "$0")/.."
source ci/setup.sh
seconds=${FUZZ_SECONDS:-15}
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "ci/fuzz-smoke.sh: installing cargo-fuzz"
  cargo install cargo-fuzz --locked --version 0.13.2
fi
export RUSTC_BOOTSTRAP=1
cd fuzz
cargo fuzz build -O
for target in wire_decode queue_recovery protocol_ops auth_decode; do
  echo "--- fuzz $target for ${seconds}s"
  mkdir -p "corpus/$target"
  work=$(mktemp -d)
  cp -r "corpus/$target/." "$work/" 2>/dev/null || true
  log="$work.log"
  # The targets' scratch files (queue_recovery's directory) go where this run removes them.
  scratch="$work.tmp"
  mkdir -p "$scratch"
  status=0
  TMPDIR="$scratch" cargo fuzz run -O "$target" "$work" -- -max_total_time="$seconds" -max_len=4096 >"$log" 2>&1 || status=$?
  grep -E "^Done|ERROR|SUMMARY|panicked" "$log" || true
  if [ "$status" -ne 0 ]; then tail -40 "$log"; fi
  rm -rf "$work" "$log" "$scratch"
  if [ "$status" -ne 0 ]; then
    echo "fuzz target $target failed (see fuzz/artifacts/$target)" >&2
    exit "$status"
  fi
done
