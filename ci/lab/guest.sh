#!/bin/bash
# Stage 2 of a lab machine (ci/lab/lab.sh), run by stage 1 (ci/guest/init) after switch_root into
# the host's root filesystem (read-only over 9p, with a tmpfs overlay). It brings up what makes
# this guest a machine of its own — its virtual disk, its NIC on the virtual network between the
# two QEMU processes, its NVDIMM when it has one — and then serves the host: it runs each command
# the host puts in its share (`cmd`, output to `out`, exit code to `rc`), one at a time, until it
# is powered off (`poweroff` as a command) or its QEMU process is killed (a power cut).
#
# The share (a host directory per machine, 9p tag `lab`) holds, from the host: `name`, `ip`,
# `boot` (this boot's number); from the guest: `ready.<boot>` once the machine is up, the logs of
# the commands and nodes it runs. Files there reach the host at once (9p without a cache), so
# they survive this machine's power cuts: that is where the client's completions go.
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm /run/lab
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /run
mkdir -p /run/lab /run/lock
off() {
  echo o >/proc/sysrq-trigger
  sleep 10
}
if ! mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 lab /run/lab; then
  echo "lab guest: cannot mount its share" >/dev/console
  off
fi
share=/run/lab
boot=$(cat $share/boot)
exec >>"$share/guest-$boot.log" 2>&1
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root TMPDIR=/tmp LANG=C.UTF-8
hostname "$(cat $share/name)"
ulimit -l unlimited
echo "lab guest $(hostname), boot $boot: kernel $(uname -r), $(nproc) vCPUs"
fail() {
  echo "lab guest: $*"
  echo "$*" >"$share/failed.$boot"
  off
}

# The NIC: QEMU's socket network between the two machines' QEMU processes.
modprobe virtio_net || fail "modprobe virtio_net"
ip link set lo up
ip addr add "$(cat $share/ip)/24" dev eth0 || fail "no eth0"
ip link set eth0 up

# The disk: its own filesystem (made by the host on the image), where the node's files live.
# Mounting it after a power cut replays its journal, as a real machine's boot would.
modprobe virtio_blk || fail "modprobe virtio_blk"
modprobe ext4 || fail "modprobe ext4"
mkdir -p /disk
for _ in $(seq 50); do [ -b /dev/vda ] && break; sleep 0.1; done
mount -t ext4 /dev/vda /disk || fail "cannot mount /dev/vda"

# The NVDIMM, when the host gave one: an fsdax namespace (made on the first boot; its info block
# lives on the NVDIMM, so later boots find it), an ext4 on it (4 KiB blocks: DAX needs a page
# per block; mkfs would pick 1 KiB on a small device), mounted with DAX.
if [ -f $share/nvdimm ]; then
  modprobe nfit && modprobe nd_pmem && modprobe dax_pmem 2>/dev/null
  for _ in $(seq 50); do [ -e /sys/bus/nd/devices/namespace0.0 ] && break; sleep 0.1; done
  mode=$(ndctl list -n namespace0.0 2>/dev/null | sed -n 's/.*"mode":"\([a-z]*\)".*/\1/p')
  if [ "$mode" != fsdax ]; then
    ndctl create-namespace -f -e namespace0.0 -m fsdax >/dev/null || fail "ndctl create-namespace"
    mkfs.ext4 -q -F -b 4096 /dev/pmem0 || fail "mkfs.ext4 /dev/pmem0"
  fi
  mkdir -p /pmem
  for _ in $(seq 50); do [ -b /dev/pmem0 ] && break; sleep 0.1; done
  mount -t ext4 -o dax /dev/pmem0 /pmem || fail "cannot mount /dev/pmem0 with dax"
fi

echo "lab guest: up ($(ip -4 -o addr show eth0 | awk '{print $4}'); $(df -h /disk | tail -1 | awk '{print $2}') disk)"
touch "$share/ready.$boot"
# The wait between two looks at the share is `read -t` on a FIFO nobody writes, a bash builtin:
# a `sleep` process 20 times a second took a third of the machine's one emulated CPU (each exec
# is dear under full emulation), taken from whatever the lab measured.
mkfifo /run/agent-idle
exec 3<>/run/agent-idle
while :; do
  if [ -f $share/cmd ]; then
    mv $share/cmd $share/running
    bash $share/running >$share/out 2>&1
    echo $? >$share/rc.tmp
    mv $share/rc.tmp $share/rc
  fi
  read -r -t 0.05 -u 3 || :
done
