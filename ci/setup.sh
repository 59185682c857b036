#!/usr/bin/env bash
# Installs what the build and the tests need, when it is missing (Debian 12, as root).
# Sourced by the other ci/ scripts; safe to run again.
set -euo pipefail

# apt_install_missing PKG...: installs the Debian packages among PKG that are not installed.
apt_install_missing() {
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "ci: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

need_apt=()
command -v cc >/dev/null 2>&1 || need_apt+=(build-essential)
command -v pkg-config >/dev/null 2>&1 || need_apt+=(pkg-config)
# Network-namespace fault tests (tests/netns.rs): ip netns, veth, nftables.
command -v ip >/dev/null 2>&1 || need_apt+=(iproute2)
command -v nft >/dev/null 2>&1 || need_apt+=(nftables)
# Tools only the tests use (not ci/install.sh, which sources this file too): the test scripts
# set MIRROR_TEST_TOOLS=1 before sourcing it.
if [ "${MIRROR_TEST_TOOLS:-0}" = 1 ]; then
  # A real Prometheus server scrapes a live pair (tests/metrics.rs).
  command -v prometheus >/dev/null 2>&1 || need_apt+=(prometheus)
  # `mirror top` is tested as a person sees it, in a terminal multiplexer (tests/top.rs).
  command -v tmux >/dev/null 2>&1 || need_apt+=(tmux)
  # A CMake project consumes the installed library (ffi/examples/cmake, ci/ffi-test.sh).
  command -v cmake >/dev/null 2>&1 || need_apt+=(cmake)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "ci/setup.sh: installing ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi

if ! command -v cargo >/dev/null 2>&1; then
  if [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
  else
    echo "ci/setup.sh: no Rust toolchain (cargo) found; install rustup first" >&2
    exit 1
  fi
fi
