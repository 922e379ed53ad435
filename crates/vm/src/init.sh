#!/bin/busybox sh
# Guest init in the initramfs of a forkbox vm sandbox: load the virtio modules, mount
# the root filesystem (virtio-blk, ext4), hand /dev, /proc and /sys over to it, put the
# agent and its start-up config on a small tmpfs at /forkbox and switch_root to the
# agent (`forkbox-agent vm-init`), which becomes PID 1.
/bin/busybox --install -s /bin
export PATH=/bin
mkdir -p /proc /sys /dev /newroot
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in virtio_ring virtio virtio_mmio virtio_blk virtio_console; do
  [ -f /lib/modules/$m.ko ] && insmod /lib/modules/$m.ko
done
i=0
while [ ! -b /dev/vda ]; do
  i=$((i + 1))
  [ $i -gt 1000 ] && { echo "forkbox-init: no /dev/vda" >&2; exit 1; }
  usleep 5000
done
mount -t ext4 -o noatime /dev/vda /newroot || { echo "forkbox-init: mount /dev/vda failed" >&2; exit 1; }
mkdir -p /newroot/dev /newroot/proc /newroot/sys /newroot/tmp /newroot/forkbox
mount -t tmpfs -o mode=0755,size=16m forkbox /newroot/forkbox
cp /forkbox/agent /forkbox/init.json /newroot/forkbox/
mount -o remount,ro /newroot/forkbox
mount --move /dev /newroot/dev
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts /newroot/dev/pts
ln -sf pts/ptmx /newroot/dev/ptmx 2>/dev/null
mount -t tmpfs -o mode=1777,nosuid,nodev shm /newroot/dev/shm
mount -t tmpfs -o mode=1777,nosuid,nodev tmp /newroot/tmp
exec switch_root /newroot /forkbox/agent vm-init
