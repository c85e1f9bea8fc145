#!/bin/sh
# Boot time of two ember binaries side by side (a change against the revision
# before it): the same kernel, initramfs and command line, timed from the VMM's
# start to the guest's userspace marker (`EMBER-GUEST-UP`, printed by the
# guest's init). Runs with busybox sh inside the nested rig, or with any POSIX
# sh on a host with VMX/SVM. Runs alternate between the two so that drift in the
# machine's speed hits both alike.
#
# usage: ember-compare.sh EMBER_A EMBER_B GUEST_DIR [RUNS]
#   EMBER_A    the ember binary to compare with (e.g. built at the older revision)
#   EMBER_B    the ember binary compared
#   GUEST_DIR  the directory guest.sh built (vmlinux, initramfs.cpio.gz)
#   RUNS       boots of each binary (default 5)
#
# Prints one line per boot, then
# `EMBER-COMPARE a median=<s> b median=<s> ratio=<b/a>`.
set -u

a=$1
b=$2
guest=$3
runs=${4:-5}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkfifo "$work/console"
cmdline="console=ttyS0 reboot=k panic=1 pci=off quiet i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd ember.action=reboot"
tag=EMBER-COMPARE
. "$(dirname "$0")/boot-time.sh"

a_times=
b_times=
i=1
while [ "$i" -le "$runs" ]; do
    for which in a b; do
        if [ "$which" = a ]; then bin=$a; else bin=$b; fi
        t=$(time_boot "$which" "$bin" --kernel "$guest/vmlinux" \
            --initrd "$guest/initramfs.cpio.gz" --cmdline "$cmdline")
        echo "$tag run $i $which $t"
        [ "$t" = fail ] && continue
        if [ "$which" = a ]; then a_times="$a_times $t"; else b_times="$b_times $t"; fi
    done
    i=$((i + 1))
done

ma=$(echo "$a_times" | median)
mb=$(echo "$b_times" | median)
runs_text="runs: a [$a_times ] b [$b_times ]"
if [ "$ma" = none ] || [ "$mb" = none ]; then
    echo "$tag incomplete: $runs_text"
    exit 1
fi
echo "$tag a median=${ma}s b median=${mb}s ratio=$(ratio "$mb" "$ma") ($runs_text)"
