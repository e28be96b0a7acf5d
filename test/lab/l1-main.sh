#!/bin/bash
# The lab inside L1, in a chroot into this machine's root (read-only; /tmp and
# /run are L1's own tmpfs). /run/lab/checkout is the vfiod checkout, /run/lab/work
# the writable work share, /run/lab/l2 L2's kernel and initramfs. Binds the
# emulated devices to vfio-pci, starts two L2 QEMUs and hands over to the gRPC
# driver (dist/test/lab/l1-driver.js).
set -euo pipefail

LAB=/run/lab
WORK=$LAB/work
OUT=$WORK/out
L1_BOOT_MS=$(awk '{printf "%d", $1 * 1000}' /proc/uptime)
NODE=$(sed -n 's/.*\blab\.node=\([^ ]*\).*/\1/p' /proc/cmdline)

now_ms() { date +%s%3N; }
say() { echo "LAB l1: $*"; }
seconds() { printf '%d.%ds' $(($1 / 1000)) $(($1 % 1000 / 100)); }
# stderr, so a failure inside $(...) still reaches the console.
fail() {
  say "FAILED: $*" >&2
  exit 1
}

say "userspace up after $(seconds "$L1_BOOT_MS") guest time"

# Shell builtins where possible: every fork costs tens of ms under TCG.

# The one device with this vendor:device (lab.sh put exactly one of each in L1).
find_bdf() {
  local d vendor device found=()
  for d in /sys/bus/pci/devices/*; do
    read -r vendor <"$d/vendor"
    read -r device <"$d/device"
    [ "$vendor:$device" = "0x${1%:*}:0x${1#*:}" ] && found+=("${d##*/}")
  done
  [ ${#found[@]} -eq 1 ] || fail "expected one PCI device $1, found ${#found[@]}: ${found[*]}"
  echo "${found[0]}"
}

# host-vfio-sysfs.md §5: driver_override, unbind, drivers_probe, check.
bound=()
bind_vfio() {
  local d=/sys/bus/pci/devices/$1 group
  [ -e "$d/driver" ] && echo "$1" >"$d/driver/unbind"
  echo vfio-pci >"$d/driver_override"
  echo "$1" >/sys/bus/pci/drivers_probe
  [ "$d/driver" -ef /sys/bus/pci/drivers/vfio-pci ] || fail "$1 did not bind to vfio-pci"
  group=$(readlink "$d/iommu_group")
  group=${group##*/}
  [ -c "/dev/vfio/$group" ] || fail "$1 is on vfio-pci but /dev/vfio/$group is missing"
  bound+=("$1 (group $group)")
}

NIC_ID=8086:10d3 NVME_ID=1b36:0010 SPARE_ID=8086:100e MANAGED_ID=8086:100f
# One slot, two functions without ACS, so one IOMMU group: a GPU and its HDMI audio
# function in miniature (a NIC stands in for the GPU, an HD Audio controller for its audio).
GROUP_PRIMARY_ID=10ec:8139 GROUP_AUDIO_ID=8086:2668
# q35's AHCI controller, grouped with the LPC bridge and the SMBus controller.
NONVIABLE=0000:00:1f.2
t=$(now_ms)
NIC=$(find_bdf $NIC_ID)
NVME=$(find_bdf $NVME_ID)
SPARE=$(find_bdf $SPARE_ID)
GROUP_PRIMARY=$(find_bdf $GROUP_PRIMARY_ID)
GROUP_AUDIO=$(find_bdf $GROUP_AUDIO_ID)
for bdf in "$NIC" "$NVME" "$SPARE" "$NONVIABLE" "$GROUP_PRIMARY" "$GROUP_AUDIO"; do bind_vfio "$bdf"; done
[ "/sys/bus/pci/devices/$GROUP_PRIMARY/iommu_group" -ef "/sys/bus/pci/devices/$GROUP_AUDIO/iommu_group" ] ||
  fail "$GROUP_PRIMARY and $GROUP_AUDIO are in different IOMMU groups"
BIND_MS=$(($(now_ms) - t))
say "bound to vfio-pci in $(seconds $BIND_MS): ${bound[*]}"
# The NIC managed binding takes: left on its host driver, its interface down.
MANAGED=$(find_bdf $MANAGED_ID)
MANAGED_DRIVER=$(readlink "/sys/bus/pci/devices/$MANAGED/driver") || fail "$MANAGED ($MANAGED_ID) has no driver: is e1000 loaded?"
MANAGED_DRIVER=${MANAGED_DRIVER##*/}
MANAGED_IF=$(ls "/sys/bus/pci/devices/$MANAGED/net" 2>/dev/null | head -1)
[ -n "$MANAGED_IF" ] || fail "$MANAGED on $MANAGED_DRIVER has no network interface"
say "left on its host driver: $MANAGED ($MANAGED_ID) on $MANAGED_DRIVER, interface $MANAGED_IF"
for m in /sys/bus/pci/devices/$NONVIABLE/iommu_group/devices/*; do
  drv=$(readlink "$m/driver") || fail "${m##*/} (group of $NONVIABLE) has no driver: the group would be viable"
  say "group of $NONVIABLE: ${m##*/} on ${drv##*/}"
done

# Spare root ports: root ports cannot be hot-plugged (qemu-qmp.md §3).
l2_qemu() { # name, MiB, more QEMU args
  local name=$1 mem=$2 ports=() n
  shift 2
  for n in 1 2 3 4; do ports+=(-device "pcie-root-port,id=rp$n,chassis=$n,slot=$n,bus=pcie.0,addr=0x$((4 + n))"); done
  qemu-system-x86_64 -accel tcg -machine q35 -cpu max -smp 1 -m "$mem" \
    -nodefaults -no-user-config -display none "${ports[@]}" \
    -serial "file:$OUT/$name-serial.log" \
    -qmp "unix:$LAB/$name.qmp,server=on,wait=off" \
    -daemonize "$@" 2>>"$OUT/$name-qemu.log" || fail "L2 QEMU $name did not start"
}
L2_STARTED_MS=$(now_ms)
# The booting L2: a busybox guest that reports PCI hot-plug on its console.
# The extra kernel options each trim a little off a boot that is slow under TCG in TCG.
l2_qemu l2 128 -kernel "$LAB/l2/kernel" -initrd "$LAB/l2/initrd.cpio" \
  -append "console=ttyS0 panic=-1 quiet loglevel=3 mitigations=off nokaslr no_timer_check cryptomgr.notests"
# The firmware-only L2: no OS acks an ACPI unplug, so device_del stays pending.
l2_qemu l2fw 64
say "L2 QEMUs started in $(seconds $(($(now_ms) - L2_STARTED_MS))): l2 (booting a guest), l2fw (firmware only)"

cat >"$LAB/lab.json" <<EOF
{
  "out": "$OUT",
  "devices": {
    "nic": { "bdf": "$NIC", "vendorDevice": "$NIC_ID" },
    "nvme": { "bdf": "$NVME", "vendorDevice": "$NVME_ID" },
    "spare": { "bdf": "$SPARE", "vendorDevice": "$SPARE_ID" },
    "managed": { "bdf": "$MANAGED", "vendorDevice": "$MANAGED_ID", "hostDriver": "$MANAGED_DRIVER", "interface": "$MANAGED_IF" },
    "nonViable": "$NONVIABLE",
    "group": [
      { "bdf": "$GROUP_PRIMARY", "vendorDevice": "$GROUP_PRIMARY_ID" },
      { "bdf": "$GROUP_AUDIO", "vendorDevice": "$GROUP_AUDIO_ID" }
    ]
  },
  "vms": {
    "boot": { "name": "l2", "qmp": "$LAB/l2.qmp", "serial": "$OUT/l2-serial.log" },
    "firmware": { "name": "l2fw", "qmp": "$LAB/l2fw.qmp" },
    "hung": { "name": "hung", "qmp": "$LAB/hung.qmp" }
  },
  "l2StartedAtMs": $L2_STARTED_MS,
  "timings": { "l1BootMs": $L1_BOOT_MS, "bindMs": $BIND_MS }
}
EOF
# nice: the booting L2 keeps its vCPU while node (driver and vfiod) starts, which
# takes tens of seconds of CPU under TCG.
# L1's poweroff ends the L2 QEMUs once the driver is done.
exec nice -n 10 "$NODE" "$LAB/checkout/dist/test/lab/l1-driver.js" "$LAB/lab.json"
