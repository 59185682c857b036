#!/usr/bin/env bash
# What every emulated guest needs, shared by ci/softroce-test.sh (one guest, soft-RoCE) and
# ci/lab/lab.sh (two guests, disks, power cuts, DRBD). Sourced from the repository's root; it
# defines, and installs nothing until called:
#
#   guest_packages PKG...   install the Debian packages that are missing (the guests run the
#                           host's binaries over 9p, so a package installed here is there too)
#   guest_kernel DIR        sets $guest_kv and $guest_vmlinux: the newest installed kernel that
#                           ships rdma_rxe, uncompressed into DIR
#   guest_initrd DIR        sets $guest_initrd: busybox, the modules stage 1 needs, ci/guest/init
#
# The recipe (full emulation; this machine's nested KVM cannot boot a stock kernel) and its
# timings are in docs/ARCHITECTURE.md ("RDMA transport").

# The emulator, a kernel, busybox for the initramfs. Each user adds its own.
GUEST_BASE_PACKAGES=(qemu-system-x86 linux-image-amd64 busybox-static kmod xz-utils iproute2)

# Sourced after ci/setup.sh (apt_install_missing).
guest_packages() { apt_install_missing "$@"; }

guest_kernel() {
  local dir=$1 d off
  guest_kv=
  for d in $(ls -1 /lib/modules | sort -V); do
    if [ -f "/boot/vmlinuz-$d" ] && [ -f "/lib/modules/$d/kernel/drivers/infiniband/sw/rxe/rdma_rxe.ko" ]; then
      guest_kv=$d
    fi
  done
  [ -n "$guest_kv" ] || { echo "ci/guest: no installed kernel with rdma_rxe" >&2; return 1; }
  mkdir -p "$dir"
  # Booting the uncompressed vmlinux (a PVH ELF) saves ~4 s of XZ decompression under emulation.
  guest_vmlinux=$dir/vmlinux-$guest_kv
  if [ ! -s "$guest_vmlinux" ]; then
    off=$(grep -obUaP '\xfd7zXZ\x00' "/boot/vmlinuz-$guest_kv" | head -1 | cut -d: -f1 || true)
    if [ -n "$off" ] && tail -c +"$((off + 1))" "/boot/vmlinuz-$guest_kv" |
      xz -dc --single-stream >"$guest_vmlinux.tmp" 2>/dev/null &&
      head -c 4 "$guest_vmlinux.tmp" | grep -q ELF; then
      mv "$guest_vmlinux.tmp" "$guest_vmlinux"
    else
      rm -f "$guest_vmlinux.tmp"
      cp "/boot/vmlinuz-$guest_kv" "$guest_vmlinux"
    fi
  fi
}

# Stage 1 only needs to reach the host's root (virtio, 9p, overlay); stage 2 loads the rest with
# modprobe from the host's /lib/modules. The soft-RoCE modules are in too (its stage 2 predates
# that and they cost nothing).
guest_initrd() {
  local dir=$1 rd ko
  guest_initrd=$dir/initrd-$guest_kv.cpio
  if [ -s "$guest_initrd" ] && [ ! ci/guest/init -nt "$guest_initrd" ] && [ ! ci/guest/lib.sh -nt "$guest_initrd" ]; then
    return 0
  fi
  rd=$(mktemp -d)
  mkdir -p "$rd/bin" "$rd/modules" "$rd/proc" "$rd/sys" "$rd/dev" "$rd/mnt"
  cp /bin/busybox "$rd/bin/busybox"
  cp ci/guest/init "$rd/init"
  chmod +x "$rd/init"
  modprobe -S "$guest_kv" -a --show-depends virtio_pci 9pnet_virtio 9p overlay veth \
    rdma_rxe rdma_ucm ib_umad |
    awk '$1 == "insmod" && !seen[$2]++ { print $2 }' | while read -r ko; do
    cp "$ko" "$rd/modules/"
    basename "$ko" >>"$rd/modules.list"
  done
  (cd "$rd" && find . | busybox cpio -o -H newc 2>/dev/null) >"$guest_initrd.tmp"
  mv "$guest_initrd.tmp" "$guest_initrd"
  rm -rf "$rd"
}

# rdma_test_binary: builds tests/rdma.rs (--features rdma,fail-points, in the default target
# directory, whose test-profile dependencies the main test build made) and prints the test
# binary's path; the soft-RoCE step and the lab run it in their guests. Run it right before the
# guest: the binary starts target/debug/mirror, which a build without the feature replaces.
rdma_test_binary() {
  local bin
  bin=$(cargo test --workspace --features rdma,fail-points --test rdma --no-run --message-format=json 2>/dev/null |
    grep '"name":"rdma"' | grep -o '"executable":"[^"]*"' | tail -1 | cut -d'"' -f4)
  [ -x "$bin" ] || { echo "no RDMA test binary (cargo test --workspace --features rdma,fail-points --test rdma --no-run)" >&2; return 1; }
  echo "$bin"
}
