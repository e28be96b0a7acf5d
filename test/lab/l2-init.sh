#!/bin/sh
# /init of the L2 guest (busybox). Reports PCI devices the host hot-plugs or
# removes as lines on ttyS0; the lab driver reads them from the serial log.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
echo "L2-READY uptime=$(cut -d' ' -f1 /proc/uptime)"
# Kernel uevents rather than polling sysfs: a polling loop under nested TCG saw
# devices 6-11 s late and kept the guest's only vCPU busy. uevent never exits,
# so it can be PID 1.
exec uevent /bin/pci-event
