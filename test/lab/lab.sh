#!/bin/bash
# vfiod's VFIO lab, host side (L0): a real vfio-pci hot-plug on a machine without
# VFIO hardware. L1 is a TCG guest with an emulated IOMMU; inside it the emulated
# NIC, NVMe and spare NIC are bound to vfio-pci (a fourth NIC stays on e1000 for
# managed binding), two L2 QEMUs run, and
# dist/test/lab/l1-driver.js drives a real vfiod over gRPC against them.
# This machine's own PCI devices are never touched. See README.md here.
#
#   lab.sh fetch   download the Debian kernel and busybox into the work dir (once)
#   lab.sh [run]   fetch, build both initramfs, boot L1; result in <work>/out/result.json
#
# Env: VFIOD_LAB_DIR     work dir and cache (default /var/tmp/vfiod-lab)
#      VFIOD_LAB_TIMEOUT seconds L1 may run before it is killed (default 480)
# Exit: 0 lab passed, 1 lab failed, 2 cannot run here, 3 fetch failed.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CHECKOUT=$(cd "$HERE/../.." && pwd)
# /var/tmp rather than /tmp: the cache should outlive a reboot that clears /tmp.
WORK=${VFIOD_LAB_DIR:-/var/tmp/vfiod-lab}
OUT=$WORK/out
L1_TIMEOUT=${VFIOD_LAB_TIMEOUT:-480}
BB=$WORK/busybox/bin/busybox

T0=$(date +%s%N)
say() {
  local ms=$((($(date +%s%N) - T0) / 1000000))
  printf '[lab %3d.%ds] %s\n' $((ms / 1000)) $((ms % 1000 / 100)) "$*"
}
die() { say "FAILED: $2"; exit "$1"; }

# ---- fetch: Debian kernel + busybox, unpacked, never installed ---------------
# Empty when apt knows no such package.
kernel_package() {
  apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}' || true
}

fetch() {
  [ -f "$WORK/fetched" ] && return 0
  mkdir -p "$WORK/cache"
  local kpkg
  kpkg=$(kernel_package)
  if [ -z "$kpkg" ]; then
    apt-get update -qq || true
    kpkg=$(kernel_package)
  fi
  [ -n "$kpkg" ] || die 3 "apt-cache knows no linux-image-amd64 (no Debian archive?)"
  (cd "$WORK/cache" && apt-get download -q -o APT::Sandbox::User=root "$kpkg" busybox-static) ||
    die 3 "apt-get download $kpkg busybox-static failed (no Debian archive?)"
  rm -rf "$WORK/linux" "$WORK/busybox"
  dpkg-deb -x "$WORK/cache/$kpkg"_*.deb "$WORK/linux"
  dpkg-deb -x "$WORK"/cache/busybox-static_*.deb "$WORK/busybox"
  local kv
  kv=$(ls "$WORK/linux/lib/modules")
  # The package ships no modules.dep (depmod runs at install); the L1 initramfs needs it.
  "$BB" depmod -b "$WORK/linux" "$kv"
  # An uncompressed ELF kernel boots through PVH, skipping the xz decompression:
  # 7 s less for L1; L2 (TCG in TCG, beside node starting) booted in 80-110 s
  # instead of 140-160 s.
  local vmlinuz=$WORK/linux/boot/vmlinuz-$kv off
  off=$(LC_ALL=C grep -obUaP '\xfd7zXZ\x00' "$vmlinuz" | head -1 | cut -d: -f1)
  rm -f "$WORK/vmlinux"
  if [ -n "$off" ] && command -v xz >/dev/null; then
    # xz reports the bytes that follow the stream as garbage: expected here.
    tail -c +$((off + 1)) "$vmlinuz" | xz -dc >"$WORK/vmlinux" 2>/dev/null || true
  fi
  if [ "$(head -c 4 "$WORK/vmlinux" 2>/dev/null)" = $'\x7fELF' ]; then
    echo vmlinux >"$WORK/kernel"
  else
    say "no ELF kernel extracted (xz missing or not an xz bzImage): booting $vmlinuz, slower"
    rm -f "$WORK/vmlinux"
    echo "linux/boot/vmlinuz-$kv" >"$WORK/kernel"
  fi
  echo "$kv" >"$WORK/fetched"
}

# ---- initramfs: busybox + an /init, uncompressed (nothing to unpack under TCG) --
# $1 staging dir, $2 init script, $3 output; the staging dir may hold more already.
mkinitramfs() {
  local s=$1 applet
  mkdir -p "$s/bin" "$s/dev" "$s/proc" "$s/sys"
  cp "$BB" "$s/bin/busybox"
  for applet in $("$BB" --list); do [ -e "$s/bin/$applet" ] || ln -s busybox "$s/bin/$applet"; done
  cp "$2" "$s/init"
  chmod +x "$s/init"
  (cd "$s" && find . | "$BB" cpio -o -H newc 2>/dev/null) >"$3"
}

# The L1 modules: 9p for the shares, vfio-pci, ahci + lpc_ich + i2c-i801 so the
# 00:1f.* group is held by host drivers (see l1-init.sh), and e1000 for the NIC that
# stays on its host driver until a managed Attach binds it.
L1_MODULES="virtio_pci 9pnet_virtio 9p vfio_pci vfio_iommu_type1 ahci lpc_ich i2c_i801 e1000"

build() {
  local kv s
  kv=$(cat "$WORK/fetched")
  s=$WORK/l2-stage
  rm -rf "$s"
  mkdir -p "$s/bin"
  cp "$HERE/l2-pci-event.sh" "$s/bin/pci-event"
  chmod +x "$s/bin/pci-event"
  mkinitramfs "$s" "$HERE/l2-init.sh" "$WORK/l2-initrd.cpio"

  s=$WORK/l1-stage
  rm -rf "$s"
  mkdir -p "$s/lib/modules/$kv"
  # modules.dep lists every module with all it needs: copy those lines' files.
  awk -v want=" $L1_MODULES " '{
      path = $1; sub(/:$/, "", path); name = path; sub(/.*\//, "", name); sub(/\.ko.*/, "", name)
      gsub(/-/, "_", name)
      if (index(want, " " name " ")) { print path; for (i = 2; i <= NF; i++) print $i }
    }' "$WORK/linux/lib/modules/$kv/modules.dep" | sort -u | while read -r m; do
    mkdir -p "$s/lib/modules/$kv/$(dirname "$m")"
    cp "$WORK/linux/lib/modules/$kv/$m" "$s/lib/modules/$kv/$m"
  done
  cp "$WORK/linux/lib/modules/$kv"/modules.{builtin,builtin.modinfo,order} "$s/lib/modules/$kv/"
  "$BB" depmod -b "$s" "$kv"
  mkdir -p "$s/newroot"
  # L2's kernel and initramfs ride in L1's: QEMU in L1 read the 65 MB kernel from
  # the 9p share in 15 s, from memory in 3 s.
  mkdir -p "$s/l2"
  cp "$WORK/$(cat "$WORK/kernel")" "$s/l2/kernel"
  cp "$WORK/l2-initrd.cpio" "$s/l2/initrd.cpio"
  mkinitramfs "$s" "$HERE/l1-init.sh" "$WORK/l1-initrd.cpio"
}

check_prerequisites() {
  local f
  for f in dist/src/main.js dist/test/lab/l1-driver.js; do
    [ -f "$CHECKOUT/$f" ] || die 2 "$CHECKOUT/$f is missing: build first (npm test runs tsc)"
  done
  command -v qemu-system-x86_64 >/dev/null || die 2 "qemu-system-x86_64 is not installed"
  NODE=$(readlink -f "$(command -v node)") || die 2 "node is not on PATH"
  # L1 sees this machine's root, but with its own tmpfs on /tmp and /run.
  case $NODE in /tmp/* | /run/*) die 2 "node at $NODE is under /tmp or /run, which L1 cannot see" ;; esac
}

run() {
  # First, so no earlier run's result can pass for this one's.
  rm -rf "$OUT"
  mkdir -p "$OUT"
  check_prerequisites
  fetch
  say "kernel $(cat "$WORK/fetched") and busybox ready in $WORK"
  build
  say "initramfs built: L2 $(du -h "$WORK/l2-initrd.cpio" | cut -f1), L1 (holding L2's kernel) $(du -h "$WORK/l1-initrd.cpio" | cut -f1)"
  [ -f "$WORK/nvme.img" ] || truncate -s 64M "$WORK/nvme.img"
  : >"$OUT/l1-serial.log"

  local kernel=$WORK/$(cat "$WORK/kernel") p9=security_model=none,multidevs=remap
  say "booting L1 (TCG, q35, intel-iommu; gives up after ${L1_TIMEOUT}s)"
  # no_timer_check: on a busy host (npm test runs other files beside this one) L1's
  # IO-APIC timer check missed its window and the kernel panicked.
  # nice: under jest other test files share these cores and have tighter deadlines.
  # --foreground keeps QEMU in this process group, so Ctrl-C reaches it too.
  timeout --foreground "$L1_TIMEOUT" nice -n 10 qemu-system-x86_64 \
    -accel tcg,thread=multi -cpu max -smp 2 -m 2048 -machine q35 \
    -device intel-iommu,intremap=on,caching-mode=on \
    -nodefaults -no-user-config -display none -no-reboot \
    -kernel "$kernel" -initrd "$WORK/l1-initrd.cpio" \
    -append "console=ttyS0 intel_iommu=on iommu=pt no_timer_check panic=-1 quiet loglevel=4 lab.node=$NODE" \
    -serial "file:$OUT/l1-serial.log" \
    -virtfs "local,path=/,mount_tag=hostroot,readonly=on,$p9" \
    -virtfs "local,path=$CHECKOUT,mount_tag=checkout,readonly=on,$p9" \
    -virtfs "local,path=$WORK,mount_tag=labwork,$p9" \
    -device e1000e,bus=pcie.0,addr=0x10 \
    -drive "file=$WORK/nvme.img,if=none,id=nvme0,format=raw" \
    -device nvme,drive=nvme0,serial=vfiodlab,bus=pcie.0,addr=0x11 \
    -device e1000,bus=pcie.0,addr=0x12 \
    -device e1000-82545em,bus=pcie.0,addr=0x13 \
    -device rtl8139,bus=pcie.0,addr=0x14.0,multifunction=on \
    -device intel-hda,bus=pcie.0,addr=0x14.1 \
    2>"$OUT/l1-qemu.log" &
  local l1=$! rc=0
  # Stopped early (lab.test.ts's watchdog, Ctrl-C), take L1 down too: timeout hands
  # the signal on to QEMU.
  trap "kill $l1 2>/dev/null || true" EXIT
  trap 'exit 143' TERM
  trap 'exit 130' INT
  # Relay L1's step lines as they arrive; tail stops once QEMU is gone.
  tail -n +1 -F --pid=$l1 "$OUT/l1-serial.log" 2>/dev/null | while IFS= read -r line; do
    line=${line%$'\r'}
    case $line in "LAB "*) say "${line#LAB }" ;; esac
  done &
  local relay=$!
  wait $l1 || rc=$?
  wait $relay || true
  [ $rc -eq 124 ] && say "L1 killed after ${L1_TIMEOUT}s"
  say "L1 exited ($rc)"

  if [ -f "$OUT/result.json" ] &&
    node -e 'process.exit(require(process.argv[1]).ok === true ? 0 : 1)' "$OUT/result.json"; then
    say "lab passed: $OUT/result.json"
    return 0
  fi
  say "lab FAILED; logs in $OUT. L1 console (last 40 lines):"
  tail -n 40 "$OUT/l1-serial.log" | tr -d '\r'
  return 1
}

case ${1:-run} in
  fetch) fetch ;;
  run) run ;;
  *) die 2 "usage: $0 [fetch|run]" ;;
esac
