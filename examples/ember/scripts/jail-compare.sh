#!/bin/sh
# Boot time of ember jailed beside ember alone: the same kernel, initramfs and
# command line, timed from the start of `ember-jailer` (or of `ember`) to the
# guest's userspace marker (`EMBER-GUEST-UP`, printed by the guest's init). Runs
# with busybox sh inside the nested rig, or with any POSIX sh on a host with
# VMX/SVM, as root. Runs alternate so that drift in the machine's speed hits both
# alike.
#
# usage: jail-compare.sh EMBER GUEST_DIR [RUNS]
#   EMBER      the ember binary (ember-jailer is taken from beside it)
#   GUEST_DIR  the directory guest.sh built (vmlinux, initramfs.cpio.gz)
#   RUNS       boots of each configuration (default 5)
#
# The jailed ember runs as uid 123, gid 100, in a chroot under a scratch
# directory, in a cgroup v2 with memory and pids limits, with the kernel and
# initramfs hard-linked into the jail. Prints one line per boot, then
# `JAIL-COMPARE ember median=<s> jailed median=<s> ratio=<jailed/ember>`. Times
# come from /proc/uptime (10 ms steps).
set -u

ember=$1
guest=$2
runs=${3:-5}
jailer=$(dirname "$ember")/ember-jailer
# Where / is the initramfs (in the rig), the jailer runs from a tmpfs root.
off_initramfs=$(dirname "$0")/off-initramfs.sh
work=$(mktemp -d)
cg2=$(awk '$3 == "cgroup2" { print $2; exit }' /proc/mounts)
if [ -z "$cg2" ]; then
    cg2=/sys/fs/cgroup
    mount -t cgroup2 none "$cg2"
fi
trap 'rm -rf "$work"; rmdir "$cg2/ember/jail-compare" "$cg2/ember" 2>/dev/null' EXIT
mkfifo "$work/console"
cmdline="console=ttyS0 reboot=k panic=1 pci=off quiet i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd ember.action=reboot"
jroot=$work/jails/ember/jail-compare/root
mkdir -p "$jroot"
ln "$guest/vmlinux" "$guest/initramfs.cpio.gz" "$jroot/"

tag=JAIL-COMPARE
. "$(dirname "$0")/boot-time.sh"

ember_times=
jail_times=
i=1
while [ "$i" -le "$runs" ]; do
    t=$(time_boot ember "$ember" --kernel "$guest/vmlinux" --initrd "$guest/initramfs.cpio.gz" \
        --cmdline "$cmdline")
    echo "JAIL-COMPARE run $i ember $t"
    [ "$t" = fail ] || ember_times="$ember_times $t"
    t=$(time_boot jailed sh "$off_initramfs" "$jailer" --id jail-compare --exec-file "$ember" --uid 123 --gid 100 \
        --chroot-base-dir "$work/jails" --cgroup-version 2 --cgroup memory.max=268435456 \
        --cgroup pids.max=64 -- --kernel /vmlinux --initrd /initramfs.cpio.gz --cmdline "$cmdline")
    echo "JAIL-COMPARE run $i jailed $t"
    [ "$t" = fail ] || jail_times="$jail_times $t"
    i=$((i + 1))
done

e=$(echo "$ember_times" | median)
j=$(echo "$jail_times" | median)
runs_text="runs: ember [$ember_times ] jailed [$jail_times ]"
if [ "$e" = none ] || [ "$j" = none ]; then
    echo "JAIL-COMPARE incomplete: $runs_text"
    exit 1
fi
echo "JAIL-COMPARE ember median=${e}s jailed median=${j}s" \
    "ratio=$(ratio "$j" "$e") ($runs_text)"
