#!/usr/bin/env bash
# The main job: a live primary + backup demo on this machine (TCP on loopback).
set -euo pipefail
cd "$(dirname "$0")/.."
source ci/setup.sh
cargo build --release --bin mirror
exec ./target/release/mirror demo "$@"
