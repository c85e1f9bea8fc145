# Shared by the boot comparisons (boot-compare.sh, jail-compare.sh,
# ember-compare.sh), io-compare.sh and h2g-stress.sh, which source it: timing
# one boot to the guest's userspace marker, QEMU's microvm machine as they run
# it, the median of a list of values, and a ratio. POSIX sh, busybox included.
#
# The sourcing script sets `work` (a scratch directory holding the FIFO
# `$work/console`) and `tag` (the prefix of its output lines) first.

now() { cut -d' ' -f1 /proc/uptime; }

# time_boot NAME COMMAND...: seconds from starting COMMAND to the marker
# `EMBER-GUEST-UP` on its stdout, or "fail"; the command must end by itself.
# Times come from /proc/uptime (10 ms steps).
#
# It also writes the boot's timeline to $work/timeline, as
# `total before-kernel kernel init`: the seconds before the guest kernel's clock
# started (the VMM's start-up, loading the kernel and initramfs, the kernel's
# entry up to its timekeeping), from then until the kernel started init, and
# from then to the marker. The guest's marker line gives the kernel's uptime at
# those two points (`init=` and `up=`, /proc/uptime in the guest).
time_boot() {
    name=$1
    shift
    start=$(now)
    "$@" >"$work/console" 2>"$work/stderr" </dev/null &
    pid=$!
    up=
    marker=
    while IFS= read -r line; do
        case "$line" in
        *EMBER-GUEST-UP*) [ -n "$up" ] || { up=$(now); marker=$line; } ;;
        esac
    done <"$work/console"
    wait "$pid"
    status=$?
    if [ -z "$up" ] || [ "$status" != 0 ]; then
        echo "$tag $name failed: exit status $status" >&2
        cat "$work/stderr" >&2
        echo fail
        return
    fi
    awk -v a="$start" -v b="$up" 'BEGIN { printf "%.2f\n", b - a }'
    echo "$marker" | tr -d '\r' | awk -v a="$start" -v b="$up" '{
        init = ""; up = ""
        for (i = 1; i <= NF; i++) {
            if ($i ~ /^init=[0-9.]+$/) init = substr($i, 6)
            if ($i ~ /^up=[0-9.]+$/) up = substr($i, 4)
        }
        total = b - a
        if (init == "" || up == "") print total, "? ? ?"
        else printf "%.2f %.2f %.2f %.2f\n", total, total - up, init, up - init
    }' >"$work/timeline"
}

# qemu_microvm MiB CMDLINE ARGS...: QEMU's microvm machine with one vCPU and
# MiB of memory, booting the guest of $guest (vmlinux, initramfs.cpio.gz) with
# CMDLINE, and ARGS (disks, network) after. No option ROMs, COM1 and no RTC,
# as ember has; the guest resets with a triple fault (reboot=t) and -no-reboot
# turns that into QEMU's exit.
qemu_microvm() {
    qemu_mib=$1
    qemu_append=$2
    shift 2
    qemu-system-x86_64 -M microvm,x-option-roms=off,isa-serial=on,rtc=off \
        -accel kvm -cpu host -m "$qemu_mib" -smp 1 -nodefaults -no-user-config -nographic \
        -serial stdio -no-reboot -kernel "$guest/vmlinux" -initrd "$guest/initramfs.cpio.gz" \
        -append "$qemu_append" "$@"
}

# median: the median of the times on stdin (space or newline separated), or
# "none".
median() {
    tr ' ' '\n' | grep -v '^$' | sort -n | awk '{ v[NR] = $1 } END { if (NR == 0) print "none"; else print v[int((NR + 1) / 2)] }'
}

# ratio A B: A / B with two decimals, or "none" when either is "none" or B is 0.
ratio() {
    awk -v a="$1" -v b="$2" 'BEGIN {
        if (a == "none" || b == "none" || b + 0 == 0) print "none"; else printf "%.2f\n", a / b
    }'
}
