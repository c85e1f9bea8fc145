#!/bin/sh
# Boot time of ember beside QEMU's microvm machine: the same kernel, initramfs
# and command line, timed from the VMM's start to the guest's userspace marker
# (`EMBER-GUEST-UP`, printed by the guest's init). Runs with busybox sh inside
# the nested rig (with rig.sh --qemu), or with any POSIX sh on a host with
# VMX/SVM. Runs alternate between the two VMMs so that drift in the machine's
# speed hits both alike.
#
# usage: boot-compare.sh EMBER GUEST_DIR [RUNS]
#   EMBER      the ember binary
#   GUEST_DIR  the directory guest.sh built (vmlinux, initramfs.cpio.gz)
#   RUNS       boots of each configuration (default 5)
#
# ember boots twice per round: as it is by default, with guest RAM in 4 KiB
# pages, and with --hugepages, which advises transparent huge pages on guest
# RAM as QEMU does by default (fewer faults on the guest's first touches).
# Prints one line per boot, then the medians and the ratios to QEMU's:
# `BOOT-COMPARE ember median=<s> ember-hugepages median=<s> qemu median=<s>
# ratio=<ember/qemu> ratio-hugepages=<ember-hugepages/qemu>`. Times come from
# /proc/uptime (10 ms steps).
#
# Each boot's line also gives its timeline (boot-time.sh): `before-kernel`, the
# seconds before the guest kernel's clock started (what the VMM adds: its
# start-up and loading the guest, and the kernel's entry), `kernel`, from then
# until the kernel started init, and `init`, from then to the marker. For ember,
# `vmm` is the part of `before-kernel` until ember started the vCPUs (its log's
# `Started ... us after the process started`): the rest is the guest kernel's
# entry. The medians of each part follow, one line per configuration:
# `BOOT-COMPARE timeline <name> total=<s> before-kernel=<s> kernel=<s> init=<s> vmm=<s>`.
# The kernel logs at `quiet` level so that console speed, which differs between
# the two VMMs' UARTs, does not decide the result. The i8042 options are those of
# ember's default command line (as of Firecracker's): they keep Linux from probing
# a mouse port and a multiplexer that ember's i8042 does not have, which costs
# about 0.4 s here; QEMU's microvm has no i8042, so they change nothing there.
set -u

ember=$1
guest=$2
runs=${3:-5}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkfifo "$work/console"
cmdline="console=ttyS0 panic=1 pci=off quiet i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd ember.action=reboot"
mem=256

tag=BOOT-COMPARE
. "$(dirname "$0")/boot-time.sh"

ember_times=
thp_times=
qemu_times=
# The timelines, one `name total before-kernel kernel init vmm` line per boot.
: >"$work/timelines"

# boot NAME COMMAND...: times one boot into `t` (the total, or "fail"), prints
# its line and keeps its timeline.
boot() {
    name=$1
    t=$(time_boot "$@")
    if [ "$t" = fail ]; then
        echo "BOOT-COMPARE run $i $name fail"
        return
    fi
    read -r total before kernel init_part <"$work/timeline"
    vmm=$(sed -n 's/.*Started .*, \([0-9]*\) us after the process started.*/\1/p' "$work/stderr" |
        awk 'NR == 1 { printf "%.2f\n", $1 / 1000000 }')
    echo "BOOT-COMPARE run $i $name $t before-kernel=$before kernel=$kernel init=$init_part" \
        "vmm=${vmm:-?}"
    echo "$name $total $before $kernel $init_part ${vmm:-?}" >>"$work/timelines"
}

i=1
while [ "$i" -le "$runs" ]; do
    boot ember "$ember" --kernel "$guest/vmlinux" --initrd "$guest/initramfs.cpio.gz" \
        --memory "$mem" --cmdline "$cmdline reboot=k"
    [ "$t" = fail ] || ember_times="$ember_times $t"
    boot ember-hugepages "$ember" --kernel "$guest/vmlinux" \
        --initrd "$guest/initramfs.cpio.gz" --memory "$mem" --hugepages \
        --cmdline "$cmdline reboot=k"
    [ "$t" = fail ] || thp_times="$thp_times $t"
    boot qemu qemu_microvm "$mem" "$cmdline reboot=t"
    [ "$t" = fail ] || qemu_times="$qemu_times $t"
    i=$((i + 1))
done

# The median of each part of the timeline, per configuration.
for name in ember ember-hugepages qemu; do
    line="BOOT-COMPARE timeline $name"
    field=2
    for part in total before-kernel kernel init vmm; do
        m=$(awk -v n="$name" -v f="$field" '$1 == n { print $f }' "$work/timelines" | grep -v '?' | median)
        line="$line $part=$m"
        field=$((field + 1))
    done
    echo "$line"
done

e=$(echo "$ember_times" | median)
h=$(echo "$thp_times" | median)
q=$(echo "$qemu_times" | median)
runs_text="runs: ember [$ember_times ] ember-hugepages [$thp_times ] qemu [$qemu_times ]"
if [ "$e" = none ] || [ "$h" = none ] || [ "$q" = none ]; then
    echo "BOOT-COMPARE incomplete: $runs_text"
    exit 1
fi
echo "BOOT-COMPARE ember median=${e}s ember-hugepages median=${h}s qemu median=${q}s" \
    "ratio=$(ratio "$e" "$q") ratio-hugepages=$(ratio "$h" "$q") ($runs_text)"
