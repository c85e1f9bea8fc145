#!/bin/sh
# Runs COMMAND with a root that pivot_root(2) accepts, keeping this process's
# PID. A process whose root is the initramfs itself (the rootfs mount, as in the
# nested rig) cannot pivot_root away from it, which the jailer does: there the
# command runs in a mount namespace of its own, chrooted into a tmpfs that holds
# bind mounts of every top-level directory of /. Anywhere else it just runs.
#
# usage: off-initramfs.sh COMMAND [ARG...]
set -eu
if ! grep -q '^rootfs / ' /proc/mounts; then
    exec "$@"
fi
top=/.off-initramfs-$$
mkdir "$top"
exec unshare -m sh -c '
    top=$1
    shift
    mount -t tmpfs -o mode=0755 tmpfs "$top"
    for dir in /*; do
        [ -d "$dir" ] && [ "$dir" != "$top" ] || continue
        mkdir "$top$dir"
        mount -o rbind "$dir" "$top$dir"
    done
    exec chroot "$top" "$@"
' off-initramfs "$top" "$@"
