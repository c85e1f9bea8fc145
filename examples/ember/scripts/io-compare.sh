#!/bin/sh
# Guest-visible disk and network throughput of ember beside QEMU's microvm
# machine: the same guest, the same disk image and a TAP each, in one run.
# Runs with busybox sh inside the nested rig (rig.sh --qemu), or with any POSIX
# sh on a host with VMX/SVM; needs root, /dev/net/tun and `ip`, and boot-time.sh
# beside it.
#
# usage: io-compare.sh EMBER GUEST_DIR [ROUNDS] [SECONDS] [BEFORE]
#   EMBER      the ember binary; ember-io-probe and ember-vsock-probe beside it
#   GUEST_DIR  the directory guest.sh built (vmlinux, initramfs.cpio.gz)
#   ROUNDS     rounds of the configurations, alternating (default 2)
#   SECONDS    length of each disk test (default 3)
#   BEFORE     another ember build (an earlier one), run as a fourth
#              configuration each round, `ember-before`, with the `Sync` engine
#
# With DATA_FS=ext4 in the environment the data disk's image lives on a fresh
# ext4 file system (a loop device; needs mkfs.ext4, util-linux's losetup, in
# the rig at /usr/local/bin, and the ext4 and loop modules), as a host keeps
# disk images on one; otherwise beside the script's other files (in the rig, a
# tmpfs). The engines see the difference: io_uring completes a read the page
# cache holds while it takes it only from a file system that can be asked not
# to block (ext4, xfs), and hands every request on a tmpfs to its worker threads.
#
# Three configurations boot in turn each round: ember with its disk on the
# synchronous engine (`Sync`, the default), ember on io_uring (`Async`), and
# QEMU (virtio-blk-device on a raw file, its defaults: the host's page cache
# and a thread pool; virtio-net-device on a TAP). In each, the guest runs,
# with O_DIRECT on a 256 MiB data disk (ember-io-probe):
#   seq-read, seq-write   1 MiB requests, one after another
#   rand-read-qd1         4 KiB at random offsets, one in flight
#   rand-read-qd32        the same, 32 in flight (32 threads)
# then TCP over the TAP (ember-vsock-probe), 64 MiB each way, as measured by
# the receiving end: tcp-g2h (the host receives), tcp-h2g (the guest receives).
#
# Prints one line per test and boot, `IO-COMPARE run <round> <config> <test>
# mib_s=<x> iops=<y> irqs_per_req=<i>`, then, per test, the medians and the
# ratios to QEMU:
# `IO-COMPARE <test> ember=<x> ember-async=<y> qemu=<z> ratio=<x/z> ratio-async=<y/z>`
# (MiB/s for sequential and TCP tests, requests per second for random reads),
# and for the disk tests the guest's virtio interrupts per request, each of
# which costs the guest two MMIO exits to the VMM (the transport's interrupt
# status and acknowledgement): `IO-COMPARE <test> irqs-per-request ember=<i> ...`.
set -u

ember=$1
guest=$2
rounds=${3:-2}
seconds=${4:-3}
before=${5:-}
bin=$(dirname "$ember")
work=$(mktemp -d)
. "$(dirname "$0")/boot-time.sh"
tap=ember-io0
host_ip=169.254.80.1
guest_ip=169.254.80.2
mac=02:00:a9:fe:50:02
data=$work
loop=
cleanup() {
    ip link del "$tap" 2>/dev/null
    [ "$data" = "$work" ] || umount "$data"
    [ -z "$loop" ] || "$losetup" -d "$loop"
    rm -rf "$work"
}
trap cleanup EXIT

for tool in ember-io-probe ember-vsock-probe; do
    if ! [ -x "$bin/$tool" ]; then
        echo "IO-COMPARE: no $tool beside $ember" >&2
        exit 1
    fi
done
{ ip tuntap add dev "$tap" mode tap 2>/dev/null || tunctl -t "$tap" >/dev/null; } || exit 1
ip addr add "$host_ip/24" dev "$tap"
ip link set "$tap" up

# The guest's tools, as a tar archive on a raw disk of their own.
(cd "$bin" && tar -cf "$work/tools.disk" ember-io-probe ember-vsock-probe)
truncate -s 64M "$work/tools.disk"
if [ "${DATA_FS:-}" = ext4 ]; then
    truncate -s 320M "$work/fs.img"
    mkfs.ext4 -q -F "$work/fs.img" || exit 1
    # util-linux's losetup, by its path: busybox's sh runs its own applet first,
    # and that one cannot set up a loop device on the rig's kernel.
    for losetup in /usr/local/bin/losetup /usr/sbin/losetup /sbin/losetup; do
        [ -x "$losetup" ] && break
    done
    loop=$("$losetup" -f --show "$work/fs.img") || exit 1
    mkdir "$work/fs"
    mount -t ext4 "$loop" "$work/fs" || exit 1
    data=$work/fs
fi
truncate -s 256M "$data/data.img"
# Filled once, so that reads find the data on the host rather than holes.
dd if=/dev/zero of="$data/data.img" bs=1M count=256 conv=notrunc 2>/dev/null
echo "IO-COMPARE data image: $(df -T "$data" | awk 'NR == 2 { print $2 }'), $(du -k "$data/data.img" | cut -f1) KiB allocated"

# The guest finds its disks by serial: script, tools, data.
cat >"$work/script.disk" <<SCRIPT
disk() { for d in /sys/block/vd*; do [ "\$(cat \$d/serial 2>/dev/null)" = "\$1" ] && echo /dev/\${d##*/}; done; }
mkdir -p /tmp/tools
tar -xf "\$(disk tools)" -C /tmp/tools
data=\$(disk data)
ip addr add $guest_ip/24 dev eth0
ip link set eth0 up
# The guest's virtio interrupts so far (only the data disk is busy during a probe).
irqs() { awk '/virtio/ { for (i = 2; i <= NF && \$i ~ /^[0-9]+\$/; i++) n += \$i } END { print n + 0 }' /proc/interrupts; }
probe() {
    name=\$1; shift; before=\$(irqs)
    result=\$(/tmp/tools/ember-io-probe "\$data" --seconds $seconds "\$@" 2>&1)
    echo "IO-RESULT \$name \$result irqs=\$((\$(irqs) - \$before))"
}
probe seq-read --read --block 1M
probe seq-write --write --block 1M
probe rand-read-qd1 --read --random --block 4K
probe rand-read-qd32 --read --random --block 4K --depth 32
/tmp/tools/ember-vsock-probe tcp-connect $host_ip:5201 --send 64M --wait-ms 30000 >/dev/null 2>&1
echo "IO-RESULT tcp-h2g \$(/tmp/tools/ember-vsock-probe tcp-listen 5202 --recv --timeout-ms 60000 2>&1)"
SCRIPT
printf '\nexit\n' >>"$work/script.disk"
truncate -s 1M "$work/script.disk"

cmdline="console=ttyS0 panic=1 pci=off quiet i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd ember.run=/dev/vda"

# ember's configuration with the data disk on ENGINE.
ember_config() {
    cat <<JSON
{
  "boot-source": {"kernel_image_path": "$guest/vmlinux", "initrd_path": "$guest/initramfs.cpio.gz",
                  "boot_args": "$cmdline reboot=k"},
  "machine-config": {"vcpu_count": 1, "mem_size_mib": 256},
  "drives": [
    {"drive_id": "script", "path_on_host": "$work/script.disk", "is_root_device": false, "is_read_only": true},
    {"drive_id": "tools", "path_on_host": "$work/tools.disk", "is_root_device": false, "is_read_only": true},
    {"drive_id": "data", "path_on_host": "$data/data.img", "is_root_device": false, "is_read_only": false,
     "io_engine": "$1"}
  ],
  "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "$tap", "guest_mac": "$mac"}]
}
JSON
}
ember_config Sync >"$work/sync.json"
ember_config Async >"$work/async.json"

# run ROUND NAME COMMAND...: boots one configuration, with the host's TCP ends
# around it, and prints its results.
run() {
    round=$1
    name=$2
    shift 2
    "$bin/ember-vsock-probe" tcp-listen 5201 --recv --timeout-ms 120000 >"$work/g2h" 2>&1 &
    g2h=$!
    "$bin/ember-vsock-probe" tcp-connect "$guest_ip:5202" --send 64M --wait-ms 120000 \
        --timeout-ms 120000 >/dev/null 2>&1 &
    h2g=$!
    "$@" >"$work/console" 2>"$work/stderr" </dev/null
    status=$?
    wait "$g2h"
    kill "$h2g" 2>/dev/null
    wait "$h2g" 2>/dev/null
    echo "IO-RESULT tcp-g2h $(cat "$work/g2h")" >>"$work/console"
    results=$(tr -d '\r' <"$work/console" | grep '^IO-RESULT ')
    if [ "$status" != 0 ] || [ "$(echo "$results" | grep -c 'mib_s=')" != 6 ]; then
        echo "IO-COMPARE run $round $name incomplete: exit status $status"
        tail -n 20 "$work/console" "$work/stderr"
    fi
    echo "$results" | while read -r _ test line; do
        mib=$(echo "$line" | sed -n 's/.*mib_s=\([0-9.]*\).*/\1/p')
        iops=$(echo "$line" | sed -n 's/.*iops=\([0-9.]*\).*/\1/p')
        requests=$(echo "$line" | sed -n 's/.*requests=\([0-9]*\).*/\1/p')
        irqs=$(echo "$line" | sed -n 's/.*irqs=\([0-9]*\).*/\1/p')
        per_req=$(ratio "${irqs:-none}" "${requests:-none}")
        echo "IO-COMPARE run $round $name $test mib_s=${mib:-?} iops=${iops:--} irqs_per_req=$per_req ($line)"
        echo "$name $test ${mib:-?} ${iops:--} $per_req" >>"$work/results"
    done
}

: >"$work/results"
round=1
while [ "$round" -le "$rounds" ]; do
    run "$round" ember "$ember" --no-api --config-file "$work/sync.json"
    run "$round" ember-async "$ember" --no-api --config-file "$work/async.json"
    if [ -n "$before" ]; then
        run "$round" ember-before "$before" --no-api --config-file "$work/sync.json"
    fi
    # The disks in the order ember gives them; the guest finds them by serial.
    run "$round" qemu qemu_microvm 256 "$cmdline reboot=t" \
        -drive "id=script,file=$work/script.disk,format=raw,if=none,readonly=on" \
        -device virtio-blk-device,drive=script,serial=script \
        -drive "id=tools,file=$work/tools.disk,format=raw,if=none,readonly=on" \
        -device virtio-blk-device,drive=tools,serial=tools \
        -drive "id=data,file=$data/data.img,format=raw,if=none" \
        -device virtio-blk-device,drive=data,serial=data \
        -netdev "tap,id=net0,ifname=$tap,script=no,downscript=no" \
        -device "virtio-net-device,netdev=net0,mac=$mac"
    round=$((round + 1))
done

# The medians of each test, per configuration, and their ratios to QEMU's.
median_of() {
    awk -v n="$1" -v t="$2" -v f="$3" '$1 == n && $2 == t { print $f }' "$work/results" |
        grep -Ev '^([?-]*|none)$' | median
}
for test in seq-read seq-write rand-read-qd1 rand-read-qd32 tcp-g2h tcp-h2g; do
    case "$test" in
    rand-*) field=4 ;;
    *) field=3 ;;
    esac
    e=$(median_of ember "$test" "$field")
    a=$(median_of ember-async "$test" "$field")
    q=$(median_of qemu "$test" "$field")
    echo "IO-COMPARE $test ember=$e ember-async=$a qemu=$q ratio=$(ratio "$e" "$q")" \
        "ratio-async=$(ratio "$a" "$q")"
    if [ -n "$before" ]; then
        b=$(median_of ember-before "$test" "$field")
        echo "IO-COMPARE $test ember=$e ember-before=$b ratio-before=$(ratio "$e" "$b")"
    fi
    case "$test" in
    tcp-*) ;;
    *)
        echo "IO-COMPARE $test irqs-per-request ember=$(median_of ember "$test" 5)" \
            "ember-async=$(median_of ember-async "$test" 5) qemu=$(median_of qemu "$test" 5)"
        ;;
    esac
done
