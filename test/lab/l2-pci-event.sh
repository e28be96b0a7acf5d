#!/bin/sh
# Run by busybox uevent with one kernel uevent in the environment.
[ "$SUBSYSTEM" = pci ] || exit 0
case "$ACTION" in
  add) tag=L2-PCI-ADD ;;
  remove) tag=L2-PCI-DEL ;;
  *) exit 0 ;;
esac
echo "$tag $PCI_SLOT_NAME $(echo "$PCI_ID" | tr A-F a-f) uptime=$(cut -d' ' -f1 /proc/uptime)"
