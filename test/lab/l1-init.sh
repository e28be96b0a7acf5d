#!/bin/sh
# /init of the lab's L1 guest (busybox). Loads the lab's modules, builds the L1
# userspace from this machine's root (9p, read-only) plus the checkout and work
# shares under /run/lab, runs l1-main.sh from the checkout in it, powers off.
# Lines starting "LAB " are relayed to the lab's output by lab.sh.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
echo "LAB l1: kernel up, $(cut -d' ' -f1 /proc/uptime)s guest time"

fail() {
  echo "LAB l1: FAILED: $*"
  poweroff -f
}

# ahci, lpc_ich and i2c-i801 keep 00:1f.0, 00:1f.2 and 00:1f.3 (one IOMMU group)
# on host drivers, so the group is really non-viable once 00:1f.2 alone moves to
# vfio-pci: the kernel counts a group whose members are all unbound as viable.
# e1000 drives the NIC a managed Attach takes and gives back (the chroot below
# cannot load modules: its /lib/modules is this machine's).
for m in virtio_pci 9pnet_virtio 9p vfio_pci vfio_iommu_type1 ahci lpc_ich i2c_i801 e1000; do
  modprobe "$m" || fail "modprobe $m"
done
# vfiod listens on 127.0.0.1 inside L1.
ip link set lo up || fail "loopback up"

p9() { # mount tag, mount point, options
  mount -t 9p -o "trans=virtio,version=9p2000.L,msize=512000,$3" "$1" "$2" || fail "mount 9p $1"
}
R=/newroot
# The read-only shares cannot change under L1, so caching them is safe and fast.
p9 hostroot $R ro,cache=loose
mount -t proc proc $R/proc
mount -t sysfs sys $R/sys
mount -t devtmpfs dev $R/dev
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts devpts $R/dev/pts
mount -t tmpfs shm $R/dev/shm
mount -t tmpfs tmp $R/tmp
mount -t tmpfs run $R/run
mkdir -p $R/run/lab/checkout $R/run/lab/work
# L2's kernel and initramfs, from this initramfs to a place the chroot sees.
mv /l2 $R/run/lab/l2
p9 checkout $R/run/lab/checkout ro,cache=loose
p9 labwork $R/run/lab/work rw

chroot $R /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  HOME=/tmp TERM=dumb /bin/bash /run/lab/checkout/test/lab/l1-main.sh
echo "LAB l1: l1-main.sh exited $?"
sync
poweroff -f
