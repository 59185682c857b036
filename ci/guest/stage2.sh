#!/bin/bash
# Stage 2 of the soft-RoCE guest (ci/softroce-test.sh), run by stage 1 after switch_root into the
# host's root filesystem (read-only over 9p, with a tmpfs overlay). Sets up one soft-RoCE device
# (rxe0) on one end of a veth pair, runs the job the host wrote into the result share
# (job.sh), writes its exit code back (rc) and powers the guest off.
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
# /tmp stays the overlay's (writable, backed by the tmpfs upper layer): a tmpfs mounted over it
# would hide the host's /tmp, where the checkout under test may live.
mount -t tmpfs tmpfs /run
mkdir -p /run/result
off() {
  sync
  echo o >/proc/sysrq-trigger
  sleep 10
}
# The job's output goes to the second serial port, which the host prints on its stdout.
exec >/dev/ttyS1 2>&1
if ! mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 result /run/result; then
  echo "guest: cannot mount the result share"
  off
fi
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root TMPDIR=/tmp LANG=C.UTF-8
hostname softroce-guest
ulimit -l unlimited
echo "guest: kernel $(uname -r), $(nproc) vCPUs, $(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo) MiB"
rc=0
{
  set -e
  ip link set lo up
  ip link add veth0 type veth peer name veth1
  ip addr add 10.77.0.1/24 dev veth0
  ip link set veth0 up
  ip link set veth1 up
  rdma link add rxe0 type rxe netdev veth0
} || rc=$?
if [ "$rc" = 0 ]; then
  # The port comes up with the veth's carrier.
  for _ in $(seq 50); do
    grep -q ACTIVE /sys/class/infiniband/rxe0/ports/1/state 2>/dev/null && break
    sleep 0.1
  done
  echo "guest: rxe0 on veth0 (10.77.0.1), port $(cat /sys/class/infiniband/rxe0/ports/1/state)"
  cd "$(cat /run/result/cwd)" || rc=1
  [ "$rc" = 0 ] && { bash /run/result/job.sh || rc=$?; }
else
  echo "guest: setting up soft-RoCE failed ($rc)"
fi
echo "$rc" >/run/result/rc
sync
umount /run/result
off
