#!/usr/bin/env bash
# Two emulated machines for the lab (ci/lab/lab.sh), sourced from the repository's root.
#
# Each machine is a QEMU process (the Debian kernel under TCG, booted as the soft-RoCE guest is:
# ci/guest/) with its own virtual disk (raw image, ext4, opened with cache=none: what the guest
# syncs reaches the image; what it does not is lost with the process), optionally an emulated
# NVDIMM, and a NIC on a virtual network joining the two QEMU processes. The network is QEMU's
# socket netdev in its UDP form: each QEMU sends the other's frames to a loopback port. (The TCP
# form, one side `listen` and the other `connect`, does not survive a power cut of the listening
# side: the connecting QEMU never reconnects. UDP has no connection to lose.)
#
#   lab_init DIR              a fresh lab under DIR (two machines: a = 10.78.0.1, b = 10.78.0.2)
#   lab_machine NAME [nvdimm|drbd]  make machine NAME's disk (and an NVDIMM, or a second raw
#                             disk for DRBD's backing device, /dev/vdb: $LAB_DRBD_DISK_SIZE)
#   lab_boot NAME...          power the machines on, wait until each is up
#   lab_cut NAME...           power cut: SIGKILL of the QEMU process
#   lab_run NAME SCRIPT [S]   run SCRIPT (bash) in the machine, S seconds at most; its output on
#                             stdout, its exit status returned
#   lab_halt                  power every machine off (SIGKILL; used at the end and on exit)
#   lab_hung_console NAME     the console of NAME's current boot, if its kernel reported tasks
#                             blocked on I/O (the emulated disk hung: a fault of the emulation)
#
# A machine's share (the 9p directory it sees as /run/lab) is $lab/NAME/share.

LAB_DISK_SIZE=${LAB_DISK_SIZE:-1G}
LAB_NVDIMM_SIZE=${LAB_NVDIMM_SIZE:-256M}
LAB_MEMORY=${LAB_MEMORY:-1536M}
LAB_CPUS=${LAB_CPUS:-1}
LAB_DRBD_DISK_SIZE=${LAB_DRBD_DISK_SIZE:-1100M}

lab_say() { printf '[lab %4ss] %s\n' "$(( $(date +%s) - lab_t0 ))" "$*"; }

lab_init() {
  lab=$1
  lab_t0=${lab_t0:-$(date +%s)}
  mkdir -p "$lab"
  source ci/guest/lib.sh
  guest_kernel "$repo/target/guest"
  guest_initrd "$repo/target/guest"
  # Two loopback UDP ports, one a machine, that nothing else has bound.
  lab_port_a=$(lab_free_udp_port)
  lab_port_b=$(lab_free_udp_port "$lab_port_a")
  trap lab_halt EXIT
}

lab_free_udp_port() {
  local p
  while :; do
    p=$(( 20000 + RANDOM % 30000 ))
    [ "$p" != "${1:-}" ] && [ -z "$(ss -Hlun "sport = :$p")" ] && break
  done
  echo "$p"
}

lab_machine() {
  local name=$1 nv=${2:-}
  local m=$lab/$name
  mkdir -p "$m/share"
  echo "$name" >"$m/share/name"
  case $name in
    a) echo 10.78.0.1 >"$m/share/ip" ;;
    b) echo 10.78.0.2 >"$m/share/ip" ;;
    *) echo "lab: machines are a and b" >&2; return 2 ;;
  esac
  echo 0 >"$m/share/boot"
  # Peers on a network authenticate: the pair's secret, in both machines' shares.
  [ -f "$lab/secret" ] || "$repo/target/release/mirror" secret "$lab/secret" >/dev/null
  install -m 600 "$lab/secret" "$m/share/secret"
  truncate -s "$LAB_DISK_SIZE" "$m/disk.img"
  mkfs.ext4 -q -F "$m/disk.img"
  if [ "$nv" = drbd ]; then
    truncate -s "$LAB_DRBD_DISK_SIZE" "$m/drbd.img"
  fi
  if [ "$nv" = nvdimm ]; then
    truncate -s "$LAB_NVDIMM_SIZE" "$m/nvdimm.img"
    touch "$m/share/nvdimm"
  fi
}

# Starts NAME's QEMU process (in the background) for its next boot.
lab_power_on() {
  local name=$1 m=$lab/$1 boot my peer mac
  boot=$(( $(cat "$m/share/boot") + 1 ))
  echo "$boot" >"$m/share/boot"
  rm -f "$m/share/cmd" "$m/share/running" "$m/share/rc" "$m/share/out"
  if [ "$name" = a ]; then my=$lab_port_a peer=$lab_port_b mac=52:54:00:78:00:01
  else my=$lab_port_b peer=$lab_port_a mac=52:54:00:78:00:02; fi
  local mem=(-m "$LAB_MEMORY") machine=pc disks=(-drive "file=$m/disk.img,format=raw,if=virtio,cache=none")
  [ -f "$m/drbd.img" ] && disks+=(-drive "file=$m/drbd.img,format=raw,if=virtio,cache=none")
  if [ -f "$m/nvdimm.img" ]; then
    machine=pc,nvdimm=on
    mem=(-m "$LAB_MEMORY,slots=2,maxmem=8G"
      -object "memory-backend-file,id=nvmem,share=on,mem-path=$m/nvdimm.img,size=$LAB_NVDIMM_SIZE"
      -device nvdimm,memdev=nvmem,id=nv1)
  fi
  qemu-system-x86_64 \
    -accel tcg,thread=multi -cpu max -smp "$LAB_CPUS" "${mem[@]}" -machine "$machine" \
    -nodefaults -no-reboot -display none -monitor none \
    -kernel "$guest_vmlinux" -initrd "$guest_initrd" \
    -append "console=ttyS0 panic=-1 quiet MIRROR_STAGE2=$repo/ci/lab/guest.sh" \
    -fsdev local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap \
    -device virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot \
    -fsdev "local,id=lab,path=$m/share,security_model=none,multidevs=remap" \
    -device virtio-9p-pci,fsdev=lab,mount_tag=lab \
    "${disks[@]}" \
    -netdev "socket,id=net0,udp=127.0.0.1:$peer,localaddr=127.0.0.1:$my" \
    -device "virtio-net-pci,netdev=net0,mac=$mac" \
    -serial "file:$m/console-$boot.log" </dev/null >"$m/qemu-$boot.log" 2>&1 &
  echo $! >"$m/qemu.pid"
  disown
}

lab_boot() {
  local name m boot deadline
  for name in "$@"; do lab_power_on "$name"; done
  for name in "$@"; do
    m=$lab/$name
    boot=$(cat "$m/share/boot")
    deadline=$(( $(date +%s) + ${LAB_BOOT_TIMEOUT:-180} ))
    while [ ! -e "$m/share/ready.$boot" ]; do
      if [ -e "$m/share/failed.$boot" ] || ! kill -0 "$(cat "$m/qemu.pid")" 2>/dev/null ||
        [ "$(date +%s)" -gt "$deadline" ]; then
        echo "lab: machine $name did not come up (boot $boot):" >&2
        cat "$m/share/failed.$boot" "$m/share/guest-$boot.log" "$m/qemu-$boot.log" 2>/dev/null | tail -20 >&2
        tail -20 "$m/console-$boot.log" >&2 2>/dev/null
        return 1
      fi
      sleep 0.2
    done
  done
}

lab_cut() {
  local name pid
  for name in "$@"; do
    pid=$(cat "$lab/$name/qemu.pid")
    kill -KILL "$pid" 2>/dev/null || true
  done
  for name in "$@"; do
    pid=$(cat "$lab/$name/qemu.pid")
    while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
    rm -f "$lab/$name/qemu.pid"
  done
}

lab_halt() {
  local name
  for name in a b; do
    [ -n "${lab:-}" ] && [ -f "$lab/$name/qemu.pid" ] && lab_cut "$name"
  done
  return 0
}

lab_run() {
  local name=$1 script=$2 limit=${3:-300} s=$lab/$1/share deadline hung gave_up polls=0
  rm -f "$s/rc" "$s/out"
  printf '%s\n' "$script" >"$s/cmd.tmp"
  mv "$s/cmd.tmp" "$s/cmd"
  deadline=$(( $(date +%s) + limit ))
  while [ ! -e "$s/rc" ]; do
    gave_up=
    if [ "$(date +%s)" -gt "$deadline" ] || [ ! -f "$lab/$name/qemu.pid" ] ||
      ! kill -0 "$(cat "$lab/$name/qemu.pid")" 2>/dev/null; then
      gave_up="command did not finish within ${limit}s"
    # Every 2 s: a command waits in vain on a machine whose disk stopped answering (its own, or
    # its peer's: a primary's writes wait for the backup's acks); say so at once.
    elif [ $(( ++polls % 40 )) = 0 ] && hung=$(lab_hung_console a || lab_hung_console b); then
      gave_up="command given up: a kernel reports tasks blocked on I/O ($hung): the emulated disk hung"
    fi
    if [ -n "$gave_up" ]; then
      cat "$s/out" 2>/dev/null
      echo "lab: machine $name: $gave_up" >&2
      return 124
    fi
    sleep 0.05
  done
  cat "$s/out"
  return "$(cat "$s/rc")"
}

# lab_hung_console NAME: prints the console log of NAME's current boot and succeeds when its
# kernel's hung-task watchdog reported a task blocked for 120 s (in this lab: I/O to the
# emulated disk that never completed, the journal's thread among the blocked; seen once in
# CI, 2026-12-07, on a backup machine booted after a cut, its image untouched from then on).
lab_hung_console() {
  local console
  console=$lab/$1/console-$(cat "$lab/$1/share/boot" 2>/dev/null).log
  grep -q 'blocked for more than' "$console" 2>/dev/null && echo "$console"
}
