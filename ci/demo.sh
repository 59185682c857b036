#!/usr/bin/env bash
# The main job: a live primary + backup demo on this machine (TCP on loopback).
set -euo pipefail
cd "$(dirname "$0")/.."
source ci/setup.sh
# The demo kills the primary exactly between an ack and its apply: a test fail point, so this
# build has the feature fail-points (a release build for users has none).
cargo build --release --features fail-points --bin mirror
exec ./target/release/mirror demo "$@"
