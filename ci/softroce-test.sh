#!/usr/bin/env bash
# Real RDMA verbs in CI: the host kernel has no RDMA (CONFIG_INFINIBAND unset), so this boots a
# Debian kernel under full emulation (qemu TCG; the machine's nested KVM cannot boot it) with one
# soft-RoCE device (rdma_rxe on a veth), and runs the project's RDMA suite inside it:
#
#   - ibv_devices and the raw verbs floor (ibv_rc_pingpong, 64 B);
#   - tests/rdma.rs over `transport = rdma`: the transport on its own (frames across ring wraps,
#     credits, wake-ups, peer loss), sync writes, a kill campaign (SIGKILL of either node under
#     load, recovery, byte-identical regions), and the error paths (wrong device, port, GID, port
#     down, unreachable peer);
#   - `mirror demo --transport rdma --writes 300`;
#   - the engine's synchronous write latency over rxe next to two floors (our own verbs ping-pong
#     over the transport's queue pairs, `RdmaPingPong` in src/bench.rs, and ibv_rc_pingpong),
#     with the ratios and the targets' verdicts: `mirror bench --rdma-iterations`, from the
#     release build (the test binary is built at opt-level 1, which slowed the engine's many
#     small functions more than the ping-pong's few).
#
# The guest sees the host's `/` read-only over virtio-9p (with a tmpfs overlay), so everything is
# built here and run there unchanged. Its output comes back on a second serial port (printed on
# our stdout), its exit code through a second 9p share; this script exits with it.
#
#   bash ci/softroce-test.sh                 # the suite
#   bash ci/softroce-test.sh -- CMD [ARGS]   # run one command in the guest instead (debugging)
#
# Recipe and measurements: docs/ARCHITECTURE.md ("RDMA transport") and the soft-RoCE notes.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
source ci/setup.sh
t0=$(date +%s)
say() { printf '[softroce %3ss] %s\n' "$(( $(date +%s) - t0 ))" "$*"; }

# 1. Packages: the guest's (ci/guest/lib.sh), rdma-core userspace (libibverbs + the rxe
#    provider, tools, perftest) and what rdma-sys needs to build (its build script links
#    libibverbs/librdmacm and runs bindgen on their headers).
source ci/guest/lib.sh
guest_packages "${GUEST_BASE_PACKAGES[@]}" libibverbs1 ibverbs-providers ibverbs-utils rdma-core \
  librdmacm1 rdmacm-utils perftest libibverbs-dev librdmacm-dev pkg-config libclang1-14 \
  libclang-common-14-dev

# 2. Kernel (the newest installed one that ships rdma_rxe) and initramfs.
work=$repo/target/softroce
guest_kernel "$work"
guest_initrd "$work"
kv=$guest_kv kernel=$guest_vmlinux initrd=$guest_initrd

# 3. What the guest runs.
run=$(mktemp -d "$work/run.XXXXXX")
echo "$repo" >"$run/cwd"
if [ "${1:-}" = "--" ]; then
  shift
  printf '%q ' "$@" >"$run/job.sh"
  echo >>"$run/job.sh"
else
  say "building on the host (release mirror, RDMA test binary; --features rdma,fail-points)"
  # The lint and the test builds share the default target directory and, with `--workspace`,
  # the main test build's features for every other crate: only the mirror crate is built again,
  # with the feature (the test binary runs the `mirror` it was built with, target/debug/mirror,
  # built just now). The release
  # command gets a directory of its own: target/release/mirror and libmirror.so must stay the
  # default build's (ci/install.sh keeps the rdma library there too).
  # The main clippy gate builds without the feature; lint the verbs code here.
  # fail-points: the kill campaign and the demo kill the primary between an ack and its apply.
  cargo clippy --workspace --all-targets --features rdma,fail-points -- -D warnings
  # The transport's pure parts (setup record, ring and credit arithmetic) need no device.
  cargo test --workspace --features rdma,fail-points --lib transport::rdma
  CARGO_TARGET_DIR=$repo/target/rdma cargo build --release --features rdma,fail-points --bin mirror
  rdma_mirror=$repo/target/rdma/release/mirror
  test_bin=$(rdma_test_binary)
  cat >"$run/job.sh" <<EOF
set -u
export MIRROR_RDMA_DEVICE=rxe0 MIRROR_RDMA_GID_INDEX=1 MIRROR_RDMA_PEER_NETDEV=veth1
rc=0
step() { printf '\n--- %s (guest %ss)\n' "\$*" "\$SECONDS"; }
step "devices"
ibv_devices
ibv_devinfo -d rxe0 | grep -E 'hca_id|transport|state|active_mtu|link_layer' || rc=1
step "verbs floor: ibv_rc_pingpong, 64 B, 5000 round trips (two processes over rxe0, GID 1)"
# The server listens on TCP for the queue pair's details: a client that comes too early (a busy
# machine) is refused and retries; neither side may wait for ever.
timeout 120 ibv_rc_pingpong -d rxe0 -g 1 -s 64 -n 5000 >/tmp/pp-server.txt 2>&1 &
pp_ok=0
for _ in \$(seq 1 50); do
  sleep 0.3
  if timeout 60 ibv_rc_pingpong -d rxe0 -g 1 -s 64 -n 5000 10.77.0.1 >/tmp/pp-client.txt 2>&1; then
    pp_ok=1
    break
  fi
  grep -q 'Connection refused\|Couldn.t connect' /tmp/pp-client.txt || break
done
[ "\$pp_ok" = 1 ] || rc=1
wait || rc=1
cat /tmp/pp-client.txt
export MIRROR_IBV_RC_PINGPONG_US=\$(sed -n 's/.* = \([0-9.]*\) usec\/iter.*/\1/p' /tmp/pp-client.txt | tail -1)
step "RDMA test suite (tests/rdma.rs over rxe0): transport, sync writes, kill campaign, errors"
$test_bin --test-threads=1 --nocapture || rc=1
step "mirror demo --transport rdma --writes 300"
$rdma_mirror demo --transport rdma --writes 300 \\
  --set rdma_device=rxe0 --set rdma_gid_index=1 || rc=1
step "figures: the engine's sync write latency over rxe0 next to the verbs floors (mirror bench, release build)"
$rdma_mirror bench --sizes '' --pipelined-sizes '' --power-writes 0 --recovery-regions '' \\
  --resync-region '' --failover-rounds 0 --security-iterations 0 --c-api-iterations 0 \\
  --rdma-iterations 2000 --set rdma_device=rxe0 --set rdma_gid_index=1 \\
  \${MIRROR_IBV_RC_PINGPONG_US:+--rdma-raw-floor-us \$MIRROR_IBV_RC_PINGPONG_US} || rc=1
step "guest done (rc=\$rc)"
exit \$rc
EOF
fi

# 4. Boot. 2 vCPUs under TCG (multi-threaded), 3 GiB; the host's / read-only plus the result
#    share read-write; ttyS0 (kernel console) to a file, ttyS1 (the job) to our stdout.
say "booting the guest (kernel $kv, TCG, 2 vCPUs)"
boot=$(date +%s)
set +e
timeout "${MIRROR_GUEST_TIMEOUT:-900}" qemu-system-x86_64 \
  -accel tcg,thread=multi -cpu max -smp 2 -m 3G -machine pc -nodefaults -no-reboot \
  -display none -monitor none \
  -kernel "$kernel" -initrd "$initrd" \
  -append "console=ttyS0 panic=-1 quiet MIRROR_STAGE2=$repo/ci/guest/stage2.sh" \
  -fsdev local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap \
  -device virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot \
  -fsdev local,id=result,path="$run",security_model=none,multidevs=remap \
  -device virtio-9p-pci,fsdev=result,mount_tag=result \
  -serial file:"$run/console.log" \
  -chardev stdio,id=out,signal=off -serial chardev:out </dev/null
qrc=$?
set -e
say "guest ran $(( $(date +%s) - boot ))s (qemu exit $qrc)"
if [ ! -s "$run/rc" ]; then
  echo "ci/softroce-test.sh: the guest wrote no exit code; its console:" >&2
  tail -40 "$run/console.log" >&2 || true
  exit 1
fi
rc=$(cat "$run/rc")
say "guest exit code $rc (wall time of this script: $(( $(date +%s) - t0 ))s)"
rm -rf "$run"
exit "$rc"
