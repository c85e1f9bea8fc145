#!/bin/sh
# End-to-end tests of ember with the project's Linux guest. Runs with busybox sh
# inside the nested rig, or with any POSIX sh on a host with VMX/SVM.
#
# usage: e2e.sh EMBER GUEST_DIR [SECTION...]
#   EMBER      the ember binary (the jailer tests take ember-jailer from beside it,
#              the vsock tests ember-vsock-probe, and off-initramfs.sh from beside
#              this script)
#   GUEST_DIR  the directory guest.sh built (vmlinux, bzImage, initramfs.cpio.gz)
#   SECTION    the sections to run, of boot, blk, rng, api, net, mmds, jail,
#              balloon, vsock, snapshot and clones (default: all, in that order);
#              each stands alone
#
# Prints `E2E SECTION <name>` as each section begins, `E2E START <boot>` before
# each boot, `E2E PASS <name>` or `E2E FAIL <name>` per test, then `N passed, N
# failed`; exits 1 when a test failed, 3 when the run was aborted because ember
# could not be killed (see `await`).
set -u

ember=$1
guest=$2
shift 2
sections=$*
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
passed=0
failed=0
base="console=ttyS0 reboot=k panic=1 pci=off i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd"

pass() {
    echo "E2E PASS $1"
    passed=$((passed + 1))
}

fail() {
    echo "E2E FAIL $1: $2"
    echo "---- console of $1"
    cat "$work/out" 2>/dev/null
    echo "---- log of $1"
    cat "$work/err" 2>/dev/null
    if [ -s "$work/host" ]; then
        echo "---- host side of $1"
        cat "$work/host"
    fi
    echo "---- files of $1"
    ls -la "$work"
    echo "---- processes"
    ps 2>/dev/null | grep -v ' \[' | tail -n 20
    echo "----"
    failed=$((failed + 1))
}

# boot NAME ARGS...: runs ember with a time limit; console in $work/out, log in
# $work/err, exit status in $status.
#
# A guest that crashes is booted once more, and the retry is printed: in the
# nested rig (emulated SVM) guests triple-fault now and then, during kernel
# start or later (seen in about one boot in 20 of the bzImage test and one run
# in 7 of the network test). A second crash is a failure.
boot() {
    name=$1
    shift
    run_ember "$name" "$@"
    if crashed; then
        echo "E2E RETRY $name: the guest crashed (KVM_EXIT_SHUTDOWN)"
        run_ember "$name" "$@"
    fi
}

# crashed: the last guest ended in a triple fault (KVM_EXIT_SHUTDOWN, which ember
# logs as "The guest reset its CPUs"); every test guest resets through the i8042.
crashed() {
    grep -q 'The guest reset its CPUs$' "$work/err"
}

run_ember() {
    started "$1"
    shift
    rm -f "$work/out"
    "$ember" --serial "file:$work/out" "$@" >"$work/stdout" 2>"$work/err" </dev/null &
    await $! 300
    : >>"$work/out"
}

# started NAME: the boot that follows, with the clock, so that a run that stops
# shows where.
started() {
    echo "E2E START $1 at $(cut -d' ' -f1 /proc/uptime) s"
}

# alive PID: PID runs (a zombie does not).
alive() {
    state=$(sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null | cut -c1)
    [ -n "$state" ] && [ "$state" != Z ]
}

# await PID SECONDS: waits for the background job PID, at most SECONDS, and sets
# $status: its exit status, or 124 when it ran too long and was killed. A process
# that SIGKILL does not end within 10 s is stuck in the kernel (KVM), and nothing
# after it could be trusted: the run ends there with what the kernel says of it.
await() {
    ticks=0
    while alive "$1" && [ "$ticks" -lt $(($2 * 5)) ]; do
        sleep 0.2
        ticks=$((ticks + 1))
    done
    if alive "$1"; then
        echo "E2E TIMEOUT: process $1 still runs after $2 s; killing it"
        kill -TERM "$1" 2>/dev/null
        sleep 2
        kill -KILL "$1" 2>/dev/null
        ticks=0
        while alive "$1" && [ "$ticks" -lt 50 ]; do
            sleep 0.2
            ticks=$((ticks + 1))
        done
        if alive "$1"; then
            stuck "$1"
        fi
        wait "$1"
        status=124
        return
    fi
    wait "$1"
    status=$?
}

# stuck PID: reports a process that survived SIGKILL and ends the run (exit 3).
stuck() {
    echo "E2E ABORT: process $1 survived SIGKILL; its threads:"
    for task in /proc/"$1"/task/*; do
        echo "-- $(cat "$task/comm" 2>/dev/null) $(grep '^State' "$task/status" 2>/dev/null)"
        cat "$task/stack" 2>/dev/null
    done
    echo "---- console"
    cat "$work/out" 2>/dev/null
    echo "---- log"
    cat "$work/err" 2>/dev/null
    echo "---- kernel messages"
    dmesg 2>/dev/null | tail -n 60
    echo "$passed passed, $((failed + 1)) failed (run aborted)"
    exit 3
}

# expect NAME STATUS PATTERN...: the last boot exited with STATUS and its
# console, log or host-side notes hold each PATTERN (grep -E), each on a line.
expect() {
    name=$1
    want=$2
    shift 2
    if [ "$status" != "$want" ]; then
        fail "$name" "exit status $status, expected $want"
        return 1
    fi
    for pattern in "$@"; do
        # The console ends its lines with CR LF.
        if ! cat "$work/out" "$work/err" "$work/host" 2>/dev/null | tr -d '\r' | grep -Eq "$pattern"; then
            fail "$name" "no line matching '$pattern'"
            return 1
        fi
    done
    pass "$name"
}

# The rig's uptime, in seconds with two decimals, and in whole milliseconds.
now() { cut -d' ' -f1 /proc/uptime; }
now_ms() { awk '{ printf "%d\n", $1 * 1000 }' /proc/uptime; }

# $work/host holds what a test observed on this side of the VM.
fresh() { rm -f "$work/out" "$work/err" "$work/stdout" "$work/host"; }

# script_disk FILE: stdin, then `exit`, as a raw disk image of whole sectors. The
# guest's init runs it with `ember.run=/dev/vdX`; `exit` keeps sh from reading the
# padding.
script_disk() {
    { cat; printf '\nexit\n'; } >"$1"
    size=$(wc -c <"$1")
    truncate -s $(((size + 511) / 512 * 512)) "$1"
}

# api_start NAME ARGS...: starts ember with an API socket at $sock (and ARGS) in the
# background, as $vm, and waits for the socket.
api_start() {
    fresh
    started "$1"
    shift
    sock=$work/api.sock
    rm -f "$sock"
    "$ember" --api-sock "$sock" --serial "file:$work/out" "$@" \
        >"$work/stdout" 2>"$work/err" </dev/null &
    socket_wait $!
}

# socket_wait PID: ember PID, started in the background, is $vm; waits (up to
# 10 s) for its API socket at $sock. With $stale set (a stopped instance left its
# socket file there, as Firecracker's does, and ember replaces it), waits until
# the socket answers rather than until the file exists.
socket_wait() {
    vm=$1
    echo "E2E PID $vm"
    n=0
    until { [ -S "$sock" ] && { [ -z "${stale:-}" ] ||
        curl -s -m 2 --unix-socket "$sock" -o /dev/null http://localhost/version; }; } ||
        ! alive "$vm" || [ $n -ge 100 ]; do
        sleep 0.1
        n=$((n + 1))
    done
    stale=
}

# api METHOD PATH [BODY]: one request; the HTTP status in $code, the body in
# $work/api.out, and a line of both in $work/host.
api() {
    code=$(curl -s -m 60 --unix-socket "$sock" -X "$1" "http://localhost$2" \
        -H 'Accept: application/json' -H 'Content-Type: application/json' \
        ${3:+-d "$3"} -o "$work/api.out" -w '%{http_code}')
    echo "API $1 $2 $code $(cat "$work/api.out")" >>"$work/host"
}

# console_wait PATTERN [SECONDS]: waits for a console line matching PATTERN.
console_wait() {
    n=0
    until tr -d '\r' 2>/dev/null <"$work/out" | grep -Eq "$1" || ! alive "$vm" ||
        [ $n -ge $((${2:-120} * 5)) ]; do
        sleep 0.2
        n=$((n + 1))
    done
}

# retry_crashed NAME FUNCTION: runs FUNCTION, and once more if its guest crashed
# (the triple faults of the nested rig, as in boot).
retry_crashed() {
    "$2"
    if crashed; then
        echo "E2E RETRY $1: the guest crashed (KVM_EXIT_SHUTDOWN)"
        "$2"
    fi
}

# --- booting -----------------------------------------------------------------------

e2e_boot() {
# vmlinux carries the PVH note: ember enters it through PVH. The guest's init
# prints its marker, writes the boot timer and reboots; ember exits 0.
fresh
boot vmlinux --kernel "$guest/vmlinux" --initrd "$guest/initramfs.cpio.gz" \
    --boot-timer --cmdline "$base ember.action=reboot"
expect vmlinux_pvh_boots_to_userspace_and_reboot_exits_0 0 \
    '^EMBER-GUEST-UP cpus=1' 'Guest-boot-time = [0-9]+ us' 'reset the VM through the i8042'

fresh
boot smp --kernel "$guest/vmlinux" --initrd "$guest/initramfs.cpio.gz" --vcpus 2 \
    --cmdline "$base ember.action=reboot"
expect two_vcpus_are_seen_by_the_guest 0 '^EMBER-GUEST-UP cpus=2'

fresh
boot bzimage --kernel "$guest/bzImage" --initrd "$guest/initramfs.cpio.gz" \
    --vcpus 2 --cmdline "$base ember.action=reboot"
expect bzimage_boots_to_userspace 0 '^EMBER-GUEST-UP cpus=2'

# poweroff goes through ACPI: the kernel finds ember's tables and writes the
# soft-off sleep type to the PM1a control register.
fresh
boot poweroff --kernel "$guest/vmlinux" --initrd "$guest/initramfs.cpio.gz" \
    --cmdline "$base ember.action=poweroff"
expect guest_poweroff_exits_0 0 '^EMBER-GUEST-UP cpus=1' 'reboot: Power down' \
    'powered off through ACPI'

# The guest sees the memory ember gave it: the kernel's "Memory: A/TK available"
# line counts T KiB of RAM, a little under 256 MiB once firmware holes are out.
fresh
boot memory --kernel "$guest/vmlinux" --initrd "$guest/initramfs.cpio.gz" --memory 256 \
    --cmdline "$base ember.action=reboot"
total=$(sed -n 's/.*Memory: [0-9]*K\/\([0-9]*\)K available.*/\1/p' "$work/out" | head -n 1)
if [ "$status" = 0 ] && [ -n "$total" ] && [ "$total" -gt 250000 ] && [ "$total" -le 262144 ]; then
    pass guest_sees_256_mib_of_ram
else
    fail guest_sees_256_mib_of_ram "exit status $status, kernel counted '${total}' KiB"
fi
}

# --- virtio-blk ------------------------------------------------------------------

e2e_blk() {
# The root file system on virtio-blk, read-write: the guest writes a file, syncs
# and reboots. A second boot of the same image finds the file, and sees its second
# disk, a read-only one, refuse writes.
cp "$guest/rootfs.ext4" "$work/root.ext4"
token="ember-e2e-$$-$(date +%s)"
script_disk "$work/write.disk" <<SCRIPT
echo "$token" >/persisted
sync
echo "DISKS \$(ls /sys/block | tr '\n' ' ')"
echo "ROOT \$(grep ' / ' /proc/mounts)"
SCRIPT
fresh
boot rootfs_write --kernel "$guest/vmlinux" --disk "$work/root.ext4,root" \
    --disk "$work/write.disk,ro,id=script" --cmdline "$base ember.run=/dev/vdb"
expect rootfs_on_virtio_blk_boots_and_runs_a_script 0 '^EMBER-GUEST-UP' \
    '^ROOT /dev/root / ext4 rw' '^EMBER-RUN-EXIT 0' 'reset the VM through the i8042'
expect two_disks_are_both_visible 0 '^DISKS vda vdb $'

script_disk "$work/read.disk" <<'SCRIPT'
echo "PERSISTED $(cat /persisted)"
echo "RO-FLAG $(cat /sys/block/vdb/ro)"
if dd if=/dev/zero of=/dev/vdb bs=512 count=1 2>/dev/null; then
    echo "RO-WRITE allowed"
else
    echo "RO-WRITE refused"
fi
echo "SERIAL $(cat /sys/block/vdb/serial)"
SCRIPT
fresh
boot rootfs_read --kernel "$guest/vmlinux" --disk "$work/root.ext4,root" \
    --disk "$work/read.disk,ro,id=script-disk" --cmdline "$base ember.run=/dev/vdb"
expect a_file_written_and_synced_survives_a_reboot 0 "^PERSISTED $token\$" '^EMBER-RUN-EXIT 0'
expect a_read_only_disk_refuses_writes 0 '^RO-FLAG 1$' '^RO-WRITE refused$'
expect the_disk_serial_is_its_id 0 '^SERIAL script-disk$'

# Drives on io_uring ("io_engine": "Async"): the guest writes 8 MiB of random
# bytes past the data disk's first 8 MiB, bypassing its page cache, and reads
# back the first 8 MiB, which the host wrote; the host checks both by checksum.
# The root file system, on an Async drive too, takes the guest's sync.
fresh
dd if=/dev/urandom of="$work/async.img" bs=1M count=8 2>/dev/null
truncate -s 16M "$work/async.img"
echo "HOST-WROTE $(head -c 8388608 "$work/async.img" | md5sum | cut -d' ' -f1)" >>"$work/host"
cp "$guest/rootfs.ext4" "$work/async-root.ext4"
script_disk "$work/async.disk" <<'SCRIPT'
echo "GUEST-READ $(dd if=/dev/vdc bs=1M count=8 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)"
dd if=/dev/urandom of=/tmp/data bs=1M count=8 2>/dev/null
dd if=/tmp/data of=/dev/vdc bs=1M seek=8 oflag=direct conv=fsync 2>/dev/null
echo "GUEST-WROTE $(md5sum </tmp/data | cut -d' ' -f1)"
echo "async $(cat /sys/block/vda/size)" >/async-root
sync
SCRIPT
cat >"$work/async.json" <<JSON
{
  "boot-source": {"kernel_image_path": "$guest/vmlinux", "boot_args": "$base ember.run=/dev/vdb"},
  "drives": [
    {"drive_id": "root", "path_on_host": "$work/async-root.ext4", "is_root_device": true,
     "is_read_only": false, "io_engine": "Async"},
    {"drive_id": "script", "path_on_host": "$work/async.disk", "is_root_device": false,
     "is_read_only": true},
    {"drive_id": "data", "path_on_host": "$work/async.img", "is_root_device": false,
     "is_read_only": false, "io_engine": "Async"}
  ]
}
JSON
boot async --no-api --config-file "$work/async.json"
echo "HOST-READ $(tail -c 8388608 "$work/async.img" | md5sum | cut -d' ' -f1)" >>"$work/host"
wrote=$(sed -n 's/^HOST-WROTE //p' "$work/host")
read_back=$(tr -d '\r' <"$work/out" | sed -n 's/^GUEST-WROTE //p')
[ -n "$wrote" ] && tr -d '\r' <"$work/out" | grep -q "^GUEST-READ $wrote\$" &&
    echo "ASYNC-READ-MATCHES" >>"$work/host"
[ -n "$read_back" ] && grep -q "^HOST-READ $read_back\$" "$work/host" &&
    echo "ASYNC-WRITE-MATCHES" >>"$work/host"
expect drives_on_io_uring_read_and_write_what_the_host_sees 0 '^EMBER-RUN-EXIT 0' \
    '^ASYNC-READ-MATCHES$' '^ASYNC-WRITE-MATCHES$' 'reset the VM through the i8042'

# A partitioned disk: the root file system in partition 1.
cp "$guest/rootfs-part.img" "$work/part.img"
fresh
boot partition --kernel "$guest/vmlinux" --disk "$work/part.img" \
    --cmdline "$base root=/dev/vda1 rw ember.action=reboot"
expect root_on_a_partition_boots 0 ' vda: vda1' '^EMBER-GUEST-UP' \
    'reset the VM through the i8042'
# The rig's files live in its RAM, which the later sections' guests and
# snapshots need: the disk images of this section go.
rm -f "$work/root.ext4" "$work/async-root.ext4" "$work/async.img" "$work/part.img"
}

# --- virtio-rng --------------------------------------------------------------------

e2e_rng() {
# entropy_config FILE SCRIPT ENTROPY: a configuration file that boots the
# initramfs, runs the script disk SCRIPT and has the entropy device ENTROPY (JSON).
entropy_config() {
    cat >"$1" <<JSON
{
  "boot-source": {"kernel_image_path": "$guest/vmlinux", "initrd_path": "$guest/initramfs.cpio.gz",
                  "boot_args": "$base ember.run=/dev/vda"},
  "drives": [{"drive_id": "script", "path_on_host": "$2", "is_root_device": false, "is_read_only": true}],
  "entropy": $3
}
JSON
}

# The guest's /dev/hwrng is ember's entropy device: 1 MiB reads back whole, and
# random (a 4 KiB block is not all zeros, nor two blocks the same).
script_disk "$work/rng.disk" <<'SCRIPT'
now() { cut -d' ' -f1 /proc/uptime; }
echo "HWRNG $(cat /sys/class/misc/hw_random/rng_current)"
t0=$(now)
echo "HWRNG-MIB $(dd if=/dev/hwrng bs=4096 count=256 2>/dev/null | wc -c)"
t1=$(now)
echo "HWRNG-SPEED $(awk "BEGIN { printf \"%d\", 1048576 / ($t1 - $t0) }")"
a=$(dd if=/dev/hwrng bs=4096 count=1 2>/dev/null | md5sum)
b=$(dd if=/dev/hwrng bs=4096 count=1 2>/dev/null | md5sum)
z=$(dd if=/dev/zero bs=4096 count=1 2>/dev/null | md5sum)
[ "$a" != "$b" ] && [ "$a" != "$z" ] && echo "HWRNG-RANDOM"
SCRIPT
entropy_config "$work/rng.json" "$work/rng.disk" '{}'
fresh
boot entropy --no-api --config-file "$work/rng.json"
tr -d '\r' <"$work/out" | sed -n 's/^HWRNG-SPEED \([0-9]*\)$/MEASURED \1 B\/s from \/dev\/hwrng unlimited/p' |
    tee -a "$work/host"
expect the_guest_reads_1_mib_of_random_bytes_from_hwrng 0 '^HWRNG virtio_rng' \
    '^HWRNG-MIB 1048576$' '^HWRNG-RANDOM$' '^EMBER-RUN-EXIT 0'

# Limited to 8 KiB/s, well under what the device gives unlimited in the nested
# rig (30 to 130 KiB/s, one 512-byte request per round trip, as loaded as the
# host is), so that the limit is what is measured: as for the disk below, once
# the bucket's first fill is spent and a first stretch has taken up what refilled
# meanwhile, over a second stretch of 32 KiB (4 s) only.
script_disk "$work/rng-rate.disk" <<'SCRIPT'
now() { cut -d' ' -f1 /proc/uptime; }
dd if=/dev/hwrng of=/dev/null bs=4096 count=2 2>/dev/null
dd if=/dev/hwrng of=/dev/null bs=4096 count=2 2>/dev/null
t0=$(now)
n=$(dd if=/dev/hwrng bs=4096 count=8 2>/dev/null | wc -c)
t1=$(now)
echo "HWRNG-RATE $(awk "BEGIN { printf \"%d\", $n / ($t1 - $t0) }")"
SCRIPT
entropy_config "$work/rng-rate.json" "$work/rng-rate.disk" \
    '{"rate_limiter": {"bandwidth": {"size": 8192, "refill_time": 1000}}}'
fresh
boot entropy_rate --no-api --config-file "$work/rng-rate.json"
rng_rate=$(tr -d '\r' <"$work/out" | sed -n 's/^HWRNG-RATE \([0-9]*\)$/\1/p')
echo "MEASURED ${rng_rate:-none} B/s from /dev/hwrng at 8 KiB/s" | tee -a "$work/host"
if [ -n "$rng_rate" ] && [ "$rng_rate" -ge $((8192 * 9 / 10)) ] &&
    [ "$rng_rate" -le $((8192 * 11 / 10)) ]; then
    echo "HWRNG-RATE-OK" >>"$work/host"
fi
expect hwrng_limited_to_8_kib_per_s_reads_at_that_rate 0 'HWRNG-RATE-OK' \
    '^EMBER-RUN-EXIT 0'
}

# --- the API -----------------------------------------------------------------------

e2e_api() {
if ! command -v curl >/dev/null; then
    fail api "curl is not installed"
else
    # Firecracker's getting-started guide, request for request (curl -i shows the
    # status lines), then Ctrl+Alt+Del, which the guest's init answers by
    # rebooting.
    getting_started_run() {
        cp "$guest/rootfs.ext4" "$work/api-root.ext4"
        api_start getting_started
        {
            curl -m 60 --unix-socket "$sock" -i \
                -X PUT 'http://localhost/boot-source' \
                -H 'Accept: application/json' \
                -H 'Content-Type: application/json' \
                -d "{
                      \"kernel_image_path\": \"$guest/vmlinux\",
                      \"boot_args\": \"console=ttyS0 reboot=k panic=1 pci=off\"
                 }"
            curl -m 60 --unix-socket "$sock" -i \
                -X PUT 'http://localhost/drives/rootfs' \
                -H 'Accept: application/json' \
                -H 'Content-Type: application/json' \
                -d "{
                      \"drive_id\": \"rootfs\",
                      \"path_on_host\": \"$work/api-root.ext4\",
                      \"is_root_device\": true,
                      \"is_read_only\": false
                 }"
            curl -m 60 --unix-socket "$sock" -i \
                -X PUT 'http://localhost/actions' \
                -H 'Accept: application/json' \
                -H 'Content-Type: application/json' \
                -d '{
                      "action_type": "InstanceStart"
                 }'
            curl -m 60 --unix-socket "$sock" -i -X GET 'http://localhost/machine-config' \
                -H 'Accept: application/json'
            echo
        } 2>&1 | tr -d '\r' | sed 's/^/CURL /' >>"$work/host"
        console_wait '^EMBER-GUEST-UP'
        api PUT /actions '{"action_type": "SendCtrlAltDel"}'
        await "$vm" 120
    }
    retry_crashed getting_started getting_started_run
    # Three 204s, then the machine configuration with its defaults.
    if [ "$(grep -c '^CURL HTTP/1.1 204' "$work/host")" = 3 ]; then
        echo "THREE-204" >>"$work/host"
    fi
    expect the_getting_started_sequence_boots_the_guest 0 'THREE-204' \
        '^CURL HTTP/1.1 200' '"vcpu_count": ?1' '"mem_size_mib": ?128' \
        '^EMBER-GUEST-UP' 'API PUT /actions 204'
    expect send_ctrl_alt_del_reboots_the_guest_cleanly 0 '^EMBER-CTRL-ALT-DEL$' \
        'reset the VM through the i8042'

    # A disk limited to 1 MiB/s, read from inside the guest with O_DIRECT, then
    # PATCHed to 4 MiB/s while the guest runs. Each rate is measured once the
    # bucket's first fill is spent and a first stretch has taken up what refilled
    # meanwhile: over the second stretch only, from its start to its end. The
    # guest waits for the host to say the PATCH is done on a disk of its own.
    # A root file system only ever mounted read-only (the others were left for
    # their journal to be replayed, which a read-only mount refuses).
    cp "$guest/rootfs.ext4" "$work/ro-root.ext4"
    dd if=/dev/urandom of="$work/limited" bs=1M count=20 2>/dev/null
    dd if=/dev/zero of="$work/signal" bs=512 count=1 2>/dev/null
    script_disk "$work/rate.disk" <<'SCRIPT'
now() { cut -d' ' -f1 /proc/uptime; }
read64k() { dd if=/dev/vdb of=/dev/null bs=64k count=$1 skip=$2 iflag=direct 2>/dev/null; }
# rate DRAIN FIRST SECOND AT: reads DRAIN, FIRST, then SECOND blocks of 64 KiB
# from block AT on, and prints the bytes per second of the SECOND stretch.
rate() {
    read64k $1 $4
    read64k $2 $(($4 + $1))
    t0=$(now)
    read64k $3 $(($4 + $1 + $2))
    t1=$(now)
    awk "BEGIN { printf \"%d\", $3 * 65536 / ($t1 - $t0) }"
}
echo "RATE1 $(rate 16 16 32 0)"
echo "PATCH-NOW"
n=0
until dd if=/dev/vdd bs=512 count=1 iflag=direct 2>/dev/null | grep -q PATCHED || [ $n -ge 300 ]; do
    sleep 0.1
    n=$((n + 1))
done
echo "RATE2 $(rate 64 64 128 64)"
SCRIPT
    cat >"$work/rate.json" <<JSON
{
  "boot-source": {"kernel_image_path": "$guest/vmlinux", "boot_args": "$base ember.run=/dev/vdc"},
  "machine-config": {"vcpu_count": 1, "mem_size_mib": 128},
  "drives": [
    {"drive_id": "rootfs", "path_on_host": "$work/ro-root.ext4", "is_root_device": true, "is_read_only": true},
    {"drive_id": "limited", "path_on_host": "$work/limited", "is_root_device": false, "is_read_only": true,
     "rate_limiter": {"bandwidth": {"size": 1048576, "refill_time": 1000}}},
    {"drive_id": "script", "path_on_host": "$work/rate.disk", "is_root_device": false, "is_read_only": true},
    {"drive_id": "signal", "path_on_host": "$work/signal", "is_root_device": false, "is_read_only": true}
  ]
}
JSON
    rate_run() {
        dd if=/dev/zero of="$work/signal" bs=512 count=1 2>/dev/null
        api_start rate_limit --config-file "$work/rate.json"
        console_wait '^PATCH-NOW' 180
        api PATCH /drives/limited '{"drive_id": "limited", "rate_limiter": {"bandwidth": {"size": 4194304, "refill_time": 1000}}}'
        printf PATCHED | dd of="$work/signal" conv=notrunc 2>/dev/null
        await "$vm" 240
    }
    retry_crashed rate rate_run
    rate1=$(tr -d '\r' <"$work/out" | sed -n 's/^RATE1 \([0-9]*\)$/\1/p')
    rate2=$(tr -d '\r' <"$work/out" | sed -n 's/^RATE2 \([0-9]*\)$/\1/p')
    echo "MEASURED ${rate1:-none} B/s at 1 MiB/s, ${rate2:-none} B/s at 4 MiB/s" >>"$work/host"
    within() { [ -n "$1" ] && [ "$1" -ge $(($2 * 9 / 10)) ] && [ "$1" -le $(($2 * 11 / 10)) ]; }
    if within "$rate1" 1048576; then echo "RATE1-OK" >>"$work/host"; fi
    if within "$rate2" 4194304; then echo "RATE2-OK" >>"$work/host"; fi
    grep MEASURED "$work/host"
    expect a_disk_limited_to_1_mib_per_s_reads_at_that_rate 0 'RATE1-OK' '^EMBER-RUN-EXIT 0'
    expect a_runtime_patch_of_the_limit_changes_the_rate 0 'API PATCH /drives/limited 204' 'RATE2-OK'

    # Pause and resume a running guest: its ticks stop while paused and go on
    # after; the state shows in GET /.
    script_disk "$work/tick.disk" <<'SCRIPT'
i=0
while [ $i -lt 600 ]; do
    echo "TICK $i"
    i=$((i + 1))
    sleep 0.1
done
SCRIPT
    pause_run() {
        api_start pause --kernel "$guest/vmlinux" --disk "$work/ro-root.ext4,root,ro" \
            --disk "$work/tick.disk,ro" --cmdline "$base ember.run=/dev/vdb"
        console_wait '^TICK 5'
        ticks() { tr -d '\r' <"$work/out" | grep -c '^TICK'; }
        api PATCH /vm '{"state": "Paused"}'
        api GET /
        sleep 1
        before=$(ticks)
        sleep 2
        after=$(ticks)
        echo "PAUSED ticks $before then $after" >>"$work/host"
        [ "$before" = "$after" ] && echo "PAUSE-HOLDS" >>"$work/host"
        api PATCH /vm '{"state": "Resumed"}'
        sleep 2
        resumed=$(ticks)
        echo "RESUMED ticks $resumed" >>"$work/host"
        [ "$resumed" -gt "$after" ] && echo "RESUME-GOES-ON" >>"$work/host"
        api PUT /actions '{"action_type": "SendCtrlAltDel"}'
        await "$vm" 120
    }
    retry_crashed pause pause_run
    expect pause_stops_a_running_guest_and_resume_continues_it 0 \
        'API PATCH /vm 204' '"state": ?"Paused"' 'PAUSE-HOLDS' 'RESUME-GOES-ON' \
        '^EMBER-CTRL-ALT-DEL$'

    # A microVM set up request by request, its log going to a named pipe that a
    # reader drains and its metrics to a file: the guest reads a disk, the host
    # swaps the disk's image while the guest runs, and the guest sees the new
    # size and contents; FlushMetrics writes a line. The guest reads with O_DIRECT,
    # past its page cache.
    { printf 'AAAA'; head -c 1048572 /dev/zero; } >"$work/swap-a"
    { printf 'BBBB'; head -c 2097148 /dev/zero; } >"$work/swap-b"
    script_disk "$work/swap.disk" <<'SCRIPT'
first() { dd if=/dev/vdb bs=512 count=1 iflag=direct 2>/dev/null | head -c 4; }
echo "SIZE1 $(cat /sys/block/vdb/size) $(first)"
echo "SWAP-NOW"
n=0
until dd if=/dev/vdd bs=512 count=1 iflag=direct 2>/dev/null | grep -q PATCHED || [ $n -ge 300 ]; do
    sleep 0.1
    n=$((n + 1))
done
echo "SIZE2 $(cat /sys/block/vdb/size) $(first)"
sleep 600
SCRIPT
    swap_run() {
        dd if=/dev/zero of="$work/signal" bs=512 count=1 2>/dev/null
        rm -f "$work/log.fifo" "$work/log.txt" "$work/metrics.json"
        mkfifo "$work/log.fifo"
        cat "$work/log.fifo" >"$work/log.txt" &
        reader=$!
        api_start drive_swap
        api PUT /logger "{\"log_path\": \"$work/log.fifo\", \"level\": \"Info\", \"show_level\": true}"
        api PUT /metrics "{\"metrics_path\": \"$work/metrics.json\"}"
        api PUT /boot-source "{\"kernel_image_path\": \"$guest/vmlinux\", \"boot_args\": \"$base ember.run=/dev/vdc\"}"
        api PUT /drives/rootfs "{\"drive_id\": \"rootfs\", \"path_on_host\": \"$work/ro-root.ext4\", \"is_root_device\": true, \"is_read_only\": true}"
        api PUT /drives/swap "{\"drive_id\": \"swap\", \"path_on_host\": \"$work/swap-a\", \"is_root_device\": false, \"is_read_only\": true}"
        api PUT /drives/script "{\"drive_id\": \"script\", \"path_on_host\": \"$work/swap.disk\", \"is_root_device\": false, \"is_read_only\": true}"
        api PUT /drives/signal "{\"drive_id\": \"signal\", \"path_on_host\": \"$work/signal\", \"is_root_device\": false, \"is_read_only\": true}"
        api PUT /actions '{"action_type": "InstanceStart"}'
        console_wait '^SWAP-NOW'
        # Every thread of the running VMM, device workers included, runs under a
        # seccomp filter (mode 2).
        filtered=yes
        for task in /proc/"$vm"/task/*; do
            mode=$(sed -n 's/^Seccomp:[[:space:]]*//p' "$task/status" 2>/dev/null)
            echo "THREAD $(cat "$task/comm" 2>/dev/null) seccomp ${mode:-?}" >>"$work/host"
            [ "$mode" = 2 ] || filtered=no
        done
        [ "$filtered" = yes ] && echo "ALL-THREADS-FILTERED" >>"$work/host"
        api PATCH /drives/swap "{\"drive_id\": \"swap\", \"path_on_host\": \"$work/swap-b\"}"
        printf PATCHED | dd of="$work/signal" conv=notrunc 2>/dev/null
        console_wait '^SIZE2'
        api PUT /actions '{"action_type": "FlushMetrics"}'
        api PUT /actions '{"action_type": "SendCtrlAltDel"}'
        await "$vm" 120
        # The reader ends when ember closes the pipe; one that never saw a writer
        # is stopped.
        n=0
        while alive "$reader" && [ $n -lt 25 ]; do
            sleep 0.2
            n=$((n + 1))
        done
        kill "$reader" 2>/dev/null
        wait "$reader"
        if grep -q 'Started 1 vCPU' "$work/log.txt"; then echo "LOG-FIFO-OK" >>"$work/host"; fi
        # One line from FlushMetrics, one at exit.
        if [ "$(grep -c '"block_swap"' "$work/metrics.json")" -ge 2 ]; then
            echo "METRICS-FLUSHED" >>"$work/host"
        fi
    }
    retry_crashed drive_swap swap_run
    expect a_drive_swapped_while_the_guest_runs_shows_its_new_image 0 \
        '^SIZE1 2048 AAAA$' 'API PATCH /drives/swap 204' '^SIZE2 4096 BBBB$' '^EMBER-CTRL-ALT-DEL$'
    expect every_thread_runs_under_a_seccomp_filter 0 'ALL-THREADS-FILTERED' \
        '^THREAD ember seccomp 2$' '^THREAD ember_api seccomp 2$' '^THREAD ember_vcpu0 seccomp 2$' \
        '^THREAD ember-blk-swap seccomp 2$' '^THREAD ember_console seccomp 2$'
    expect the_log_goes_to_a_named_pipe_and_metrics_flush_on_request 0 \
        'API PUT /logger 204' 'LOG-FIFO-OK' 'API PUT /actions 204' 'METRICS-FLUSHED'
fi
}

# --- virtio-net -------------------------------------------------------------------

e2e_net() {
# The network test guest's own root file system.
cp "$guest/rootfs.ext4" "$work/net-root.ext4"

# net_run: one boot of the network test guest, with the host side of the test
# beside it; the guest's console in $work/out, what the host saw in $work/host.
net_run() {
    fresh
    # nc's listener half-closes when its stdin ends: hold stdin open with a FIFO.
    exec 7<>"$work/hold"
    nc -l -p 5001 <"$work/hold" >"$work/from-guest" &
    listener=$!
    started network
    "$ember" --serial "file:$work/out" --kernel "$guest/vmlinux" \
        --disk "$work/net-root.ext4,root" --disk "$work/data,ro" --disk "$work/net.disk,ro" \
        --net "tap=$tap,mac=02:00:a9:fe:4d:02" \
        --cmdline "$base ember.run=/dev/vdc" >"$work/stdout" 2>"$work/err" </dev/null &
    vm=$!
    # Host to guest, once the guest has sent its data and listens.
    n=0
    until grep -q '^SENT' "$work/out" 2>/dev/null || ! alive "$vm" || [ $n -ge 240 ]; do
        sleep 1
        n=$((n + 1))
    done
    if ping -c 3 -W 2 "$guest_ip" >/dev/null; then echo "PING guest ok" >>"$work/host"; fi
    n=0
    until ! alive "$vm" || nc "$guest_ip" 5002 <"$work/data" >/dev/null 2>&1 || [ $n -ge 30 ]; do
        sleep 1
        n=$((n + 1))
    done
    await "$vm" 300
    kill "$listener" 2>/dev/null
    exec 7>&-
    echo "FROM-GUEST $(md5sum <"$work/from-guest" | cut -d' ' -f1)" >>"$work/host"
}

# A TAP on this side at 169.254.77.1, the guest at 169.254.77.2 behind it: ping
# both ways, then 4 MiB over TCP each way (busybox nc), compared by checksum.
tap=ember-e2e0
host_ip=169.254.77.1
guest_ip=169.254.77.2
if ! [ -c /dev/net/tun ] || ! { ip tuntap add dev "$tap" mode tap 2>/dev/null || tunctl -t "$tap" >/dev/null 2>&1; }; then
    fail network "cannot create the TAP $tap here (needs root and /dev/net/tun)"
else
    ip addr add "$host_ip/24" dev "$tap"
    ip link set "$tap" up
    dd if=/dev/urandom of="$work/data" bs=1M count=4 2>/dev/null
    sum=$(md5sum <"$work/data" | cut -d' ' -f1)
    mkfifo "$work/hold"
    script_disk "$work/net.disk" <<SCRIPT
ip addr add $guest_ip/24 dev eth0
ip link set eth0 up
n=0
until ping -c 1 -W 1 $host_ip >/dev/null 2>&1 || [ \$n -ge 30 ]; do
    n=\$((n + 1))
done
ping -c 3 -W 2 $host_ip >/dev/null && echo "PING host ok"
dd if=/dev/vdb bs=1M count=4 2>/dev/null | nc $host_ip 5001
echo "SENT \$?"
mkfifo /tmp/hold
exec 7<>/tmp/hold
nc -l -p 5002 </tmp/hold >/tmp/from-host
echo "RECEIVED \$(md5sum </tmp/from-host | cut -d' ' -f1)"
SCRIPT
    net_run
    if crashed; then
        echo "E2E RETRY network: the guest crashed (KVM_EXIT_SHUTDOWN) during the test"
        net_run
    fi
    expect guest_pings_the_host_and_the_host_the_guest 0 '^PING host ok$' '^PING guest ok$'
    expect tcp_transfer_from_the_guest_arrives_intact 0 '^SENT 0$' "^FROM-GUEST $sum\$"
    expect tcp_transfer_to_the_guest_arrives_intact 0 "^RECEIVED $sum\$"
    ip link del "$tap" 2>/dev/null || tunctl -d "$tap" >/dev/null 2>&1
fi
}

# --- MMDS ----------------------------------------------------------------------------

e2e_mmds() {
# The guest reaches the metadata service at 169.254.169.254 through its interface
# eth0, whose TAP has no address on this side: ember answers ARP, TCP and HTTP
# itself. Under V1 busybox wget reads a listing, a nested value and (as JSON) a
# list; under V2 a request without a token is refused, one with a token is
# answered, and a PATCH /mmds made while the guest runs is what its next
# request sees.
mtap=ember-mmds0
mmds_mac=02:00:a9:fe:50:02
if ! [ -c /dev/net/tun ] || ! { ip tuntap add dev "$mtap" mode tap 2>/dev/null || tunctl -t "$mtap" >/dev/null 2>&1; }; then
    fail mmds "cannot create the TAP $mtap here (needs root and /dev/net/tun)"
elif ! command -v curl >/dev/null; then
    fail mmds "curl is not installed"
else
    ip link set "$mtap" up
    cat >"$work/metadata.json" <<JSON
{"latest": {"meta-data": {
  "ami-id": "ami-ember",
  "network": {"interfaces": {"macs": {"$mmds_mac": {"local-ipv4s": "169.254.80.2"}}}},
  "tags": ["alpha", "beta", "gamma"]
}}}
JSON
    # mmds_config FILE SCRIPT VERSION: a configuration file that boots the
    # initramfs, runs the script disk SCRIPT with the signal disk next to it, and
    # has MMDS VERSION on eth0.
    mmds_config() {
        cat >"$1" <<JSON
{
  "boot-source": {"kernel_image_path": "$guest/vmlinux", "initrd_path": "$guest/initramfs.cpio.gz",
                  "boot_args": "$base ember.run=/dev/vda"},
  "drives": [
    {"drive_id": "script", "path_on_host": "$2", "is_root_device": false, "is_read_only": true},
    {"drive_id": "signal", "path_on_host": "$work/mmds-signal", "is_root_device": false, "is_read_only": true}
  ],
  "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "$mtap", "guest_mac": "$mmds_mac"}],
  "mmds-config": {"version": "$3", "network_interfaces": ["eth0"]}
}
JSON
    }
    mmds_up='ip addr add 169.254.80.2/16 dev eth0
ip link set eth0 up
m=http://169.254.169.254/latest/meta-data'
    script_disk "$work/mmds-v1.disk" <<SCRIPT
$mmds_up
echo "V1-LIST \$(wget -q -O - \$m/ | tr '\n' ' ')"
echo "V1-NESTED \$(wget -q -O - \$m/network/interfaces/macs/$mmds_mac/local-ipv4s)"
echo "V1-JSON-LIST \$(wget -q -O - --header 'Accept: application/json' \$m/tags)"
SCRIPT
    script_disk "$work/mmds-v2.disk" <<'SCRIPT'
ip addr add 169.254.80.2/16 dev eth0
ip link set eth0 up
m=http://169.254.169.254/latest/meta-data
# raw REQUEST: one HTTP/1.1 exchange with busybox nc (wget cannot PUT).
raw() { printf "$1" | nc 169.254.169.254 80 | tr -d '\r'; }
echo "V2-NO-TOKEN $(raw 'GET /latest/meta-data/ami-id HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n\r\n' | head -n 1)"
token=$(raw 'PUT /latest/api/token HTTP/1.1\r\nHost: 169.254.169.254\r\nX-metadata-token-ttl-seconds: 60\r\nConnection: close\r\n\r\n' | tail -n 1)
echo "V2-TOKEN-LENGTH ${#token}"
echo "V2-WITH-TOKEN $(wget -q -O - --header "X-metadata-token: $token" $m/ami-id)"
echo "V2-BAD-TOKEN $(wget -q -O - --header 'X-metadata-token: forged' $m/ami-id || echo refused)"
echo "PATCH-NOW"
n=0
until dd if=/dev/vdb bs=512 count=1 iflag=direct 2>/dev/null | grep -q PATCHED || [ $n -ge 300 ]; do
    sleep 0.1
    n=$((n + 1))
done
echo "V2-AFTER-PATCH $(wget -q -O - --header "X-metadata-token: $token" $m/ami-id)"
SCRIPT
    mmds_config "$work/mmds-v1.json" "$work/mmds-v1.disk" V1
    mmds_config "$work/mmds-v2.json" "$work/mmds-v2.disk" V2
    mmds_v1_run() {
        dd if=/dev/zero of="$work/mmds-signal" bs=512 count=1 2>/dev/null
        api_start mmds_v1 --config-file "$work/mmds-v1.json" --metadata "$work/metadata.json"
        await "$vm" 180
    }
    retry_crashed mmds_v1 mmds_v1_run
    expect mmds_v1_serves_a_listing_a_nested_value_and_a_list 0 \
        '^V1-LIST ami-id network/ tags ?$' '^V1-NESTED 169.254.80.2$' \
        '^V1-JSON-LIST \["alpha", ?"beta", ?"gamma"\]$' '^EMBER-RUN-EXIT 0'
    mmds_v2_run() {
        dd if=/dev/zero of="$work/mmds-signal" bs=512 count=1 2>/dev/null
        api_start mmds_v2 --config-file "$work/mmds-v2.json" --metadata "$work/metadata.json"
        console_wait '^PATCH-NOW' 120
        api PATCH /mmds '{"latest": {"meta-data": {"ami-id": "ami-patched"}}}'
        api GET /mmds
        printf PATCHED | dd of="$work/mmds-signal" conv=notrunc 2>/dev/null
        await "$vm" 120
    }
    retry_crashed mmds_v2 mmds_v2_run
    expect mmds_v2_refuses_a_request_without_a_token 0 '^V2-NO-TOKEN HTTP/1.1 401' \
        '^V2-BAD-TOKEN refused$'
    expect mmds_v2_answers_with_a_session_token 0 '^V2-TOKEN-LENGTH 64$' \
        '^V2-WITH-TOKEN ami-ember$'
    expect a_patch_of_mmds_is_seen_by_the_next_guest_request 0 'API PATCH /mmds 204' \
        '"ami-id": ?"ami-patched"' '^V2-AFTER-PATCH ami-patched$' '^EMBER-RUN-EXIT 0'
    ip link del "$mtap" 2>/dev/null || tunctl -d "$mtap" >/dev/null 2>&1
fi
}

# --- the jailer ---------------------------------------------------------------------

e2e_jail() {
# ember-jailer, beside ember, starts it as uid 123 in a chroot under $jails, in a
# cgroup v2 with memory and pids limits, in a network namespace holding a TAP
# owned by that uid. The guest boots from the rootfs placed in the jail through
# Firecracker's getting-started requests on the default socket, pings the host
# over the TAP, and Ctrl+Alt+Del ends it. From this side: the process's root,
# ids, cgroup, namespaces and descriptors, and a drive path that climbs out of
# the jail.
jailer=$(dirname "$ember")/ember-jailer
# Where / is the initramfs (in the rig), the jailer runs from a tmpfs root.
off_initramfs=$(dirname "$0")/off-initramfs.sh
jails=$work/jails
juid=123
jgid=100
jtap=ember-jail0
jhost_ip=169.254.78.1
jguest_ip=169.254.78.2

# jail_start ID OUT ARGS...: runs the jailer for ID in the background, as $vm
# (the jailer becomes ember), with ARGS for ember and its stdout in OUT, and
# waits for the API socket at $sock (ember's default, /run/firecracker.socket in
# the jail).
jail_start() {
    id=$1
    jout=$2
    shift 2
    jroot=$jails/ember/$id/root
    sock=$jroot/run/firecracker.socket
    stale=
    [ -S "$sock" ] && stale=1
    sh "$off_initramfs" "$jailer" --id "$id" --exec-file "$ember" --uid "$juid" --gid "$jgid" \
        --chroot-base-dir "$jails" --cgroup-version 2 --cgroup memory.max=268435456 \
        --cgroup pids.max=64 --netns "/proc/$netns_pid/ns/net" -- "$@" \
        >"$jout" 2>>"$work/err" </dev/null &
    socket_wait $!
}

# jail_check: what this side sees of the jailed ember $vm, as lines in $work/host.
jail_check() {
    if [ "$(stat -L -c %d:%i "/proc/$vm/root")" = "$(stat -c %d:%i "$jroot")" ]; then
        echo "ROOT-IS-THE-JAIL" >>"$work/host"
    fi
    echo "LS-ROOT $(ls "/proc/$vm/root" | tr '\n' ' ')" >>"$work/host"
    grep -E '^(Uid|Gid|Groups):' "/proc/$vm/status" | tr '\t' ' ' | sed 's/^/STATUS /' >>"$work/host"
    echo "CGROUP $(cat "/proc/$vm/cgroup")" >>"$work/host"
    cg=$cg2/ember/$id
    echo "LIMITS memory.max=$(cat "$cg/memory.max") pids.max=$(cat "$cg/pids.max")" >>"$work/host"
    [ "$(readlink "/proc/$vm/ns/mnt")" != "$(readlink /proc/self/ns/mnt)" ] &&
        echo "OWN-MOUNT-NS" >>"$work/host"
    [ "$(readlink "/proc/$vm/ns/net")" = "$(readlink "/proc/$netns_pid/ns/net")" ] &&
        echo "IN-THE-NETNS" >>"$work/host"
    # Every descriptor past stdio is a KVM object, an eventfd, epoll, timer,
    # signalfd, socket or pipe, or a file inside the jail.
    find "$jroot" -xdev -exec stat -c %d:%i {} + >"$work/jail-inodes"
    outside=
    for fd in /proc/"$vm"/fd/*; do
        n=${fd##*/}
        [ "$n" -gt 2 ] || continue
        target=$(readlink "$fd")
        echo "FD $n $target" >>"$work/host"
        case $target in
        anon_inode:* | socket:* | pipe:*) ;;
        *) grep -qx "$(stat -L -c %d:%i "$fd")" "$work/jail-inodes" || outside="$outside $n" ;;
        esac
    done
    [ -z "$outside" ] && echo "FDS-IN-JAIL" >>"$work/host"
    [ -n "$outside" ] && echo "FDS-OUTSIDE$outside" >>"$work/host"
}

# iproute2's ip (busybox's has no tuntap), by path: busybox sh runs its own
# applet for a bare `ip`.
iproute2=
for candidate in /usr/local/sbin/ip /usr/sbin/ip /sbin/ip /usr/bin/ip /bin/ip; do
    if [ -z "$iproute2" ] && "$candidate" -V 2>/dev/null | grep -q iproute2; then
        iproute2=$candidate
    fi
done
if ! [ -x "$jailer" ]; then
    fail jail "no ember-jailer beside $ember"
elif ! command -v curl >/dev/null || ! [ -c /dev/net/tun ] || [ -z "$iproute2" ]; then
    fail jail "needs curl, /dev/net/tun and iproute2's ip (for a TAP with an owner)"
else
    # The cgroup v2 hierarchy: where it is mounted, else mounted here (the rig
    # has none).
    cg2=$(awk '$3 == "cgroup2" { print $2; exit }' /proc/mounts)
    if [ -z "$cg2" ]; then
        cg2=/sys/fs/cgroup
        mount -t cgroup2 none "$cg2"
    fi
    # A network namespace, held open by a sleeping process, with a TAP owned by
    # the jail's uid.
    unshare -n sleep 100000 &
    netns_pid=$!
    sleep 0.2
    inns() { nsenter -t "$netns_pid" -n "$@"; }
    inns ip link set lo up
    inns "$iproute2" tuntap add dev "$jtap" mode tap user "$juid"
    inns ip addr add "$jhost_ip/24" dev "$jtap"
    inns ip link set "$jtap" up
    script_disk "$work/jail.disk" <<SCRIPT
ip addr add $jguest_ip/24 dev eth0
ip link set eth0 up
n=0
until ping -c 1 -W 1 $jhost_ip >/dev/null 2>&1 || [ \$n -ge 30 ]; do
    n=\$((n + 1))
done
ping -c 3 -W 2 $jhost_ip >/dev/null && echo "PING host ok"
echo "JAIL-GUEST-READY"
sleep 600
SCRIPT

    # The operator places the kernel (a hard link), the rootfs and the script
    # disk in the jail, owned by the jail's uid, before the jailer runs.
    jail_run() {
        fresh
        started jail
        jroot=$jails/ember/e2e-jail-1/root
        mkdir -p "$jroot"
        ln -f "$guest/vmlinux" "$jroot/vmlinux"
        cp "$guest/rootfs.ext4" "$jroot/rootfs.ext4"
        cp "$work/jail.disk" "$jroot/script.disk"
        chown "$juid:$jgid" "$jroot/rootfs.ext4" "$jroot/script.disk"
        t0=$(now)
        jail_start e2e-jail-1 "$work/out"
        echo "JAIL-SOCKET after $(awk "BEGIN { print $(now) - $t0 }") s" >>"$work/host"
        api GET /
        jail_check
        api PUT /drives/escape '{"drive_id": "escape", "path_on_host": "../../../../etc/shadow", "is_root_device": false, "is_read_only": true}'
        [ "$code" = 400 ] && echo "ESCAPE-REFUSED" >>"$work/host"
        # The same ID again, while this one runs, is refused.
        sh "$off_initramfs" "$jailer" --id e2e-jail-1 --exec-file "$ember" --uid "$juid" \
            --gid "$jgid" --chroot-base-dir "$jails" >"$work/again.out" 2>&1 </dev/null
        echo "SAME-ID status $? $(head -c 300 "$work/again.out")" >>"$work/host"
        # Firecracker's getting-started requests, with paths inside the jail.
        api PUT /boot-source "{\"kernel_image_path\": \"/vmlinux\", \"boot_args\": \"$base ember.run=/dev/vdb\"}"
        api PUT /drives/rootfs '{"drive_id": "rootfs", "path_on_host": "/rootfs.ext4", "is_root_device": true, "is_read_only": false}'
        api PUT /drives/script '{"drive_id": "script", "path_on_host": "/script.disk", "is_root_device": false, "is_read_only": true}'
        api PUT /network-interfaces/eth0 "{\"iface_id\": \"eth0\", \"guest_mac\": \"02:00:a9:fe:4e:02\", \"host_dev_name\": \"$jtap\"}"
        api PUT /actions '{"action_type": "InstanceStart"}'
        console_wait '^JAIL-GUEST-READY'
        inns ping -c 3 -W 2 "$jguest_ip" >/dev/null && echo "PING guest ok" >>"$work/host"
        # A second jail, with another ID, runs at the same time.
        vm1=$vm
        sock1=$sock
        jail_start e2e-jail-2 "$work/out2"
        api GET /
        grep -q '"id": *"e2e-jail-2"' "$work/api.out" && echo "SECOND-JAIL-SERVES" >>"$work/host"
        kill -TERM "$vm"
        await "$vm" 30
        echo "SECOND-JAIL-STOPPED status $status" >>"$work/host"
        vm=$vm1
        sock=$sock1
        jroot=$jails/ember/e2e-jail-1/root
        api PUT /actions '{"action_type": "SendCtrlAltDel"}'
        await "$vm" 120
    }
    retry_crashed jail jail_run
    expect the_jailer_runs_ember_unprivileged_in_its_chroot_cgroup_and_namespaces 0 \
        'API GET / 200' 'ROOT-IS-THE-JAIL' "^STATUS Uid: $juid $juid $juid $juid\$" \
        "^STATUS Gid: $jgid $jgid $jgid $jgid\$" '^STATUS Groups: *$' \
        '^CGROUP 0::/ember/e2e-jail-1$' '^LIMITS memory.max=268435456 pids.max=64$' \
        'OWN-MOUNT-NS' 'IN-THE-NETNS' 'FDS-IN-JAIL'
    expect a_jailed_drive_path_cannot_climb_out_of_the_jail 0 \
        'API PUT /drives/escape 400' 'ESCAPE-REFUSED'
    expect the_jailed_getting_started_sequence_boots_and_pings_over_the_tap 0 \
        'API PUT /boot-source 204' 'API PUT /network-interfaces/eth0 204' \
        'API PUT /actions 204' '^EMBER-GUEST-UP' '^PING host ok' '^PING guest ok$' \
        '^EMBER-CTRL-ALT-DEL$'
    expect two_jails_run_at_once_and_the_same_id_twice_is_refused 0 \
        '^SAME-ID status 1 Jailer error: .*holds the jail .*e2e-jail-1' 'SECOND-JAIL-SERVES' '^SECOND-JAIL-STOPPED status 143$'

    # The jail the first run left is reused by a new start with its ID.
    fresh
    started jail_again
    jail_start e2e-jail-1 "$work/out"
    api GET /
    kill -TERM "$vm" 2>/dev/null
    await "$vm" 30
    # The socket file stays, as Firecracker leaves it; the next start replaces it.
    [ -S "$sock" ] && echo "API-SOCKET-LEFT" >>"$work/host"
    expect a_jail_left_by_a_finished_run_does_not_block_its_id 143 'API GET / 200' \
        'API-SOCKET-LEFT'

    kill "$netns_pid" 2>/dev/null
    for id in e2e-jail-1 e2e-jail-2; do rmdir "$cg2/ember/$id" 2>/dev/null; done
    rmdir "$cg2/ember" 2>/dev/null
fi
}

# --- virtio-balloon -----------------------------------------------------------------

e2e_balloon() {
# A 256 MiB guest fills 200 MiB of tmpfs and frees it, so that ember's RSS holds
# those pages; PATCH /balloon then inflates the balloon by half the guest's memory
# (128 MiB) and ember's RSS falls by at least 80 % of that. Statistics, polled
# every second, are counted over 5 s. Then, with the balloon still inflated, the
# guest allocates more than it has left: deflate-on-OOM gives pages back to it.
# Last, PATCH /balloon to 0 deflates it.
if ! command -v curl >/dev/null; then
    fail balloon "curl is not installed"
else
    script_disk "$work/balloon.disk" <<'SCRIPT'
echo "AVAILABLE $(sed -n 's/^MemAvailable: *//p' /proc/meminfo)"
mount -t tmpfs -o size=240m tmpfs /mnt
dd if=/dev/zero of=/mnt/fill bs=1M count=200 2>/dev/null
echo "FILLED $(du -m /mnt/fill | cut -f1) MiB"
rm /mnt/fill
umount /mnt
echo "BALLOON-NOW"
n=0
until dd if=/dev/vdb bs=512 count=1 iflag=direct 2>/dev/null | grep -q INFLATED || [ $n -ge 1200 ]; do
    sleep 0.1
    n=$((n + 1))
done
echo "BALLOONED $(sed -n 's/^MemTotal: *//p' /proc/meminfo) total, $(sed -n 's/^MemAvailable: *//p' /proc/meminfo) available"
mount -t tmpfs -o size=240m tmpfs /mnt
if dd if=/dev/zero of=/mnt/fill bs=1M count=160 2>/dev/null; then
    echo "OOM-FILL ok $(du -m /mnt/fill | cut -f1) MiB"
else
    echo "OOM-FILL failed $(du -m /mnt/fill | cut -f1) MiB"
fi
rm /mnt/fill
umount /mnt
sleep 120
SCRIPT
    dd if=/dev/zero of="$work/balloon-signal" bs=512 count=1 2>/dev/null
    cat >"$work/balloon.json" <<JSON
{
  "boot-source": {"kernel_image_path": "$guest/vmlinux", "initrd_path": "$guest/initramfs.cpio.gz",
                  "boot_args": "$base ember.run=/dev/vda"},
  "machine-config": {"vcpu_count": 1, "mem_size_mib": 256},
  "drives": [
    {"drive_id": "script", "path_on_host": "$work/balloon.disk", "is_root_device": false, "is_read_only": true},
    {"drive_id": "signal", "path_on_host": "$work/balloon-signal", "is_root_device": false, "is_read_only": true}
  ],
  "balloon": {"amount_mib": 0, "deflate_on_oom": true, "stats_polling_interval_s": 1}
}
JSON
    # balloon_value FIELD: a number of the last answer's JSON.
    balloon_value() { tr -d ' \n' <"$work/api.out" | sed -n "s/.*\"$1\":\([0-9]*\).*/\1/p"; }
    balloon_metric() { sed -n "s/^ember_balloon_$1 \([0-9]*\)\$/\1/p" "$work/api.out"; }
    balloon_rss() { sed -n 's/^VmRSS:[^0-9]*\([0-9]*\) kB$/\1/p' "/proc/$vm/status"; }
    # balloon_wait MIB: waits (up to 60 s) for the balloon to hold MIB MiB.
    balloon_wait() {
        n=0
        while [ $n -lt 300 ]; do
            api GET /balloon/statistics
            [ "$(balloon_value actual_mib)" = "$1" ] && return 0
            sleep 0.2
            n=$((n + 1))
        done
        return 1
    }
    balloon_run() {
        dd if=/dev/zero of="$work/balloon-signal" bs=512 count=1 conv=notrunc 2>/dev/null
        api_start balloon --config-file "$work/balloon.json"
        console_wait '^BALLOON-NOW' 180
        api GET /metrics
        updates0=$(balloon_metric stats_updates_count)
        sleep 5
        api GET /metrics
        updates1=$(balloon_metric stats_updates_count)
        api GET /balloon/statistics
        rss0=$(balloon_rss)
        api PATCH /balloon '{"amount_mib": 128}'
        balloon_wait 128 && echo "INFLATED-TO-128" >>"$work/host"
        rss1=$(balloon_rss)
        api GET /metrics
        pages=$(balloon_metric inflated_pages)
        printf INFLATED | dd of="$work/balloon-signal" conv=notrunc 2>/dev/null
        console_wait '^OOM-FILL' 120
        api GET /balloon/statistics
        api PATCH /balloon '{"amount_mib": 0}'
        balloon_wait 0 && echo "DEFLATED-TO-0" >>"$work/host"
        api PUT /actions '{"action_type": "SendCtrlAltDel"}'
        await "$vm" 120
        dropped=$((${rss0:-0} - ${rss1:-0}))
        echo "BALLOON-RECLAIM RSS ${rss0:-?} kB -> ${rss1:-?} kB: ${dropped} kB back of 131072 kB inflated ($((dropped * 100 / 131072)) %), ${pages:-?} pages given back" >>"$work/host"
        [ "$dropped" -ge $((131072 * 8 / 10)) ] && echo "RECLAIM-OK" >>"$work/host"
        echo "BALLOON-STATS ${updates0:-?} -> ${updates1:-?} updates in 5 s at 1 s" >>"$work/host"
        if [ -n "${updates0}" ] && [ -n "${updates1}" ]; then
            polls=$((updates1 - updates0))
            [ "$polls" -ge 4 ] && [ "$polls" -le 6 ] && echo "STATS-AT-INTERVAL" >>"$work/host"
        fi
    }
    retry_crashed balloon balloon_run
    grep -E 'BALLOON-|^OOM-FILL|^FILLED|^BALLOONED' "$work/host" "$work/out" 2>/dev/null | tr -d '\r'
    expect inflating_half_the_guest_gives_80_percent_of_it_back_to_the_host 0 \
        '^FILLED 200 MiB' 'API PATCH /balloon 204' 'INFLATED-TO-128' 'RECLAIM-OK'
    expect balloon_statistics_arrive_at_the_polling_interval 0 'STATS-AT-INTERVAL' \
        '"total_memory": ?[0-9]+' '"free_memory": ?[0-9]+'
    expect deflate_on_oom_lets_a_guest_allocation_succeed 0 '^OOM-FILL ok 160 MiB'
    expect patching_the_balloon_to_0_deflates_it 0 'DEFLATED-TO-0' '^EMBER-CTRL-ALT-DEL$'
fi
}

# --- virtio-vsock -------------------------------------------------------------------

e2e_vsock() {
# ember's vsock device through Firecracker's hybrid host side. ember-vsock-probe
# (beside ember) is both ends: here on ember's Unix sockets, in the guest on
# AF_VSOCK, copied there from a raw disk of its own. One guest runs, in turn:
# 64 MiB each way with matching checksums; 100 connections at once each way; a
# host peer that reads nothing for 5 s and then gets all 16 MiB; a guest that
# floods 4 connections whose host peer reads nothing for 20 s, while ember's own
# memory (its RSS but guest RAM) stays within the device's bound; a
# request/response loop of 1000 rounds (what Kata's and firecracker-containerd's
# agents do) with its latency; then the same transfers and loop over a TAP
# network with TCP, beside them (E2E INFO lines).
probe=$(dirname "$ember")/ember-vsock-probe
vtap=ember-e2e1
vhost_ip=169.254.78.1
vguest_ip=169.254.78.2
if ! command -v curl >/dev/null; then
    fail vsock "curl is not installed"
elif ! [ -x "$probe" ]; then
    fail vsock "no ember-vsock-probe beside $ember"
else
    probe_size=$(wc -c <"$probe")
    cp "$probe" "$work/probe.disk"
    truncate -s $(((probe_size + 511) / 512 * 512)) "$work/probe.disk"
    tcp=no
    vnet=
    if [ -c /dev/net/tun ] && { ip tuntap add dev "$vtap" mode tap 2>/dev/null || tunctl -t "$vtap" >/dev/null 2>&1; }; then
        ip addr add "$vhost_ip/24" dev "$vtap"
        ip link set "$vtap" up
        tcp=yes
        vnet="{\"iface_id\": \"eth0\", \"host_dev_name\": \"$vtap\", \"guest_mac\": \"02:00:a9:fe:4e:02\"}"
    fi
    script_disk "$work/vsock.disk" <<SCRIPT
P=/tmp/probe
dd if=/dev/vdb of=\$P bs=64k iflag=count_bytes count=$probe_size 2>/dev/null
chmod +x \$P
# run NAME ARGS...: one run of the probe; its result line, then its errors,
# each prefixed with NAME.
run() {
    name=\$1
    shift
    out=\$(\$P "\$@" 2>/tmp/probe.err)
    echo "\$name status=\$? \$out"
    sed "s/^/\$name ERR /" /tmp/probe.err
}
echo "VSOCK-AT 5000"
run VSOCK-H2G listen 5000 --recv
run VSOCK-G2H connect 5001 --send 64M --wait-ms 60000
echo "VSOCK-AT 5002"
run VSOCK-MANY-H2G listen 5002 --echo --conns 100
run VSOCK-MANY-G2H connect 5003 --conns 100 --send 64K --recv --expect 64K --wait-ms 60000
echo "VSOCK-AT 5004"
run VSOCK-SLOW listen 5004 --send 16M
echo "VSOCK-FLOOD-NOW"
sleep 2
run VSOCK-FLOOD connect 5005 --conns 4 --send 16M --wait-ms 60000
echo "VSOCK-AT 5006"
run VSOCK-PING listen 5006 --echo
if [ $tcp = yes ]; then
    ip addr add $vguest_ip/24 dev eth0
    ip link set eth0 up
    echo "VSOCK-AT 5100"
    run TCP-H2G tcp-listen 5100 --recv
    run TCP-G2H tcp-connect $vhost_ip:5101 --send 64M --wait-ms 60000
    echo "VSOCK-AT 5102"
    run TCP-PING tcp-listen 5102 --echo
fi
echo "VSOCK-DONE"
# This side reads the metrics, then ends the guest with Ctrl+Alt+Del.
sleep 120
SCRIPT
    uds=$work/v.sock
    cat >"$work/vsock.json" <<JSON
{
  "boot-source": {"kernel_image_path": "$guest/vmlinux", "initrd_path": "$guest/initramfs.cpio.gz",
                  "boot_args": "$base ember.run=/dev/vda"},
  "machine-config": {"vcpu_count": 1, "mem_size_mib": 128},
  "drives": [
    {"drive_id": "script", "path_on_host": "$work/vsock.disk", "is_root_device": false, "is_read_only": true},
    {"drive_id": "probe", "path_on_host": "$work/probe.disk", "is_root_device": false, "is_read_only": true}
  ],
  "network-interfaces": [$vnet],
  "vsock": {"guest_cid": 3, "uds_path": "$uds"}
}
JSON
    # vsock_rss: ember's VmRSS, in kB. vsock_own_rss: the same without guest RAM
    # (the mapping of the guest's 128 MiB), which the guest fills as it pleases.
    vsock_rss() { sed -n 's/^VmRSS:[^0-9]*\([0-9]*\) kB$/\1/p' "/proc/$vm/status"; }
    vsock_own_rss() {
        awk '/^[0-9a-f]+-[0-9a-f]+ / { guest = 0 }
            /^Size:/ { guest = ($2 == 131072) }
            /^Rss:/ && !guest { sum += $2 }
            END { print sum + 0 }' "/proc/$vm/smaps"
    }
    # peer NAME ARGS...: a run of the probe on this side; its output, on one
    # line, prefixed with NAME in $work/host.
    peer() {
        name=$1
        shift
        echo "$name $("$probe" "$@" 2>&1 | tr '\n' ' ')" >>"$work/host"
    }
    # listener NAME ARGS...: a run of the probe in the background, its output in
    # $work/peer-NAME; `listened` adds it to $work/host as peer does.
    listener() {
        name=$1
        shift
        "$probe" "$@" >"$work/peer-$name" 2>&1 &
        listening="$listening $name:$!"
    }
    listened() {
        for entry in $listening; do
            kill "${entry#*:}" 2>/dev/null
            wait "${entry#*:}"
            echo "${entry%%:*} $(tr '\n' ' ' <"$work/peer-${entry%%:*}")" >>"$work/host"
        done
    }
    vsock_run() {
        rm -f "$uds" "$uds"_*
        listening=
        api_start vsock --config-file "$work/vsock.json"
        api GET /vm/config
        listener G2H uds-listen "${uds}_5001" --recv --timeout-ms 900000
        listener MANY-G2H uds-listen "${uds}_5003" --echo --conns 100 --timeout-ms 900000
        listener FLOOD uds-listen "${uds}_5005" --recv --expect 16M --conns 4 --pause-ms 20000 \
            --timeout-ms 900000
        [ $tcp = no ] || listener TCP-G2H tcp-listen 5101 --recv --timeout-ms 900000
        console_wait '^VSOCK-AT 5000' 300
        peer H2G uds-connect "$uds" 5000 --send 64M --wait-ms 30000
        console_wait '^VSOCK-AT 5002' 300
        peer MANY-H2G uds-connect "$uds" 5002 --conns 100 --send 64K --recv --expect 64K \
            --wait-ms 30000
        console_wait '^VSOCK-AT 5004' 300
        peer SLOW uds-connect "$uds" 5004 --recv --expect 16M --pause-ms 5000 --wait-ms 30000
        console_wait '^VSOCK-FLOOD-NOW' 300
        rss0=$(vsock_rss)
        own0=$(vsock_own_rss)
        sleep 15
        rss1=$(vsock_rss)
        own1=$(vsock_own_rss)
        # The device's worker runs under its seccomp filter.
        for task in /proc/"$vm"/task/*; do
            if [ "$(cat "$task/comm" 2>/dev/null)" = ember-vsock ]; then
                echo "THREAD ember-vsock seccomp $(sed -n 's/^Seccomp:[[:space:]]*//p' "$task/status")" >>"$work/host"
            fi
        done
        console_wait '^VSOCK-AT 5006' 300
        peer PING uds-connect "$uds" 5006 --ping 1000 --size 64 --wait-ms 30000
        if [ $tcp = yes ]; then
            console_wait '^VSOCK-AT 5100' 300
            peer TCP-H2G tcp-connect "$vguest_ip:5100" --send 64M --wait-ms 30000
            console_wait '^VSOCK-AT 5102' 300
            peer TCP-PING tcp-connect "$vguest_ip:5102" --ping 1000 --size 64 --wait-ms 30000
        fi
        console_wait '^VSOCK-DONE' 300
        api GET /metrics
        grep -E '^ember_vsock_(conns_added|conns_killed|rx_bytes_count|tx_bytes_count) ' \
            "$work/api.out" >>"$work/host"
        api PUT /actions '{"action_type": "SendCtrlAltDel"}'
        await "$vm" 120
        listened
        echo "FLOOD-RSS VmRSS ${rss0:-?} kB -> ${rss1:-?} kB, without guest RAM ${own0:-?} kB -> ${own1:-?} kB" >>"$work/host"
        # 4 connections of at most 256 KiB each held for a host peer that does
        # not read, and slack for the allocator: 8 MiB.
        if [ -n "$own0" ] && [ -n "$own1" ] && [ $((own1 - own0)) -le 8192 ]; then
            echo "FLOOD-RSS-BOUNDED" >>"$work/host"
        fi
        # same_sum GUEST HOST: the guest's line GUEST and this side's line HOST
        # both succeeded and carry the same checksum.
        same_sum() {
            g=$(tr -d '\r' <"$work/out" | sed -n "s/^$1 status=0 conns=1 ok=1 .* sum=\([0-9a-f]*\) .*/\1/p")
            h=$(sed -n "s/^$2 conns=1 ok=1 .* sum=\([0-9a-f]*\) .*/\1/p" "$work/host")
            [ -n "$g" ] && [ "$g" = "$h" ] && echo "SUMS-MATCH $1 $g" >>"$work/host"
        }
        same_sum VSOCK-H2G H2G
        same_sum VSOCK-G2H G2H
        same_sum TCP-H2G TCP-H2G
        same_sum TCP-G2H TCP-G2H
    }
    retry_crashed vsock vsock_run
    # rate FILE NAME: the figures of the receiving side's line NAME in FILE: the
    # guest's (the console) for host to guest, this side's for guest to host.
    rate() { tr -d '\r' <"$1" | sed -n "s/^$2 .*ms=\([0-9]*\) mib_s=\([0-9.]*\).*/\2 MiB\/s (\1 ms)/p" | head -n 1; }
    latency() { sed -n "s/^$1 .*rtt_us_min=\([0-9]*\) rtt_us_median=\([0-9]*\) rtt_us_p99=\([0-9]*\).*/min \1 us, median \2 us, p99 \3 us/p" "$work/host"; }
    echo "E2E INFO vsock 64 MiB host to guest: $(rate "$work/out" VSOCK-H2G); over TAP/TCP: $(rate "$work/out" TCP-H2G)"
    echo "E2E INFO vsock 64 MiB guest to host: $(rate "$work/host" G2H); over TAP/TCP: $(rate "$work/host" TCP-G2H)"
    echo "E2E INFO vsock request/response round trip (64 B, 1000 rounds): $(latency PING); over TAP/TCP: $(latency TCP-PING)"
    echo "E2E INFO vsock flood: $(sed -n 's/^FLOOD-RSS //p' "$work/host")"
    expect vsock_carries_64_mib_from_the_host_to_the_guest_intact 0 \
        '"vsock": ?\{"guest_cid": ?3' 'SUMS-MATCH VSOCK-H2G' '^H2G conns=1 ok=1 sent=67108864'
    expect vsock_carries_64_mib_from_the_guest_to_the_host_intact 0 \
        'SUMS-MATCH VSOCK-G2H' '^G2H conns=1 ok=1 sent=0 received=67108864'
    expect vsock_serves_100_host_connections_at_once 0 \
        '^MANY-H2G conns=100 ok=100 ' '^VSOCK-MANY-H2G status=0 conns=100 ok=100 '
    expect vsock_serves_100_guest_connections_at_once 0 \
        '^VSOCK-MANY-G2H status=0 conns=100 ok=100 ' '^MANY-G2H conns=100 ok=100 '
    expect a_host_peer_that_stops_reading_for_5_s_loses_nothing 0 \
        '^SLOW conns=1 ok=1 sent=0 received=16777216' '^VSOCK-SLOW status=0 '
    expect a_flooding_guest_stays_within_the_memory_bound 0 'FLOOD-RSS-BOUNDED' \
        '^FLOOD conns=4 ok=4 sent=0 received=67108864' '^VSOCK-FLOOD status=0 '
    expect the_vsock_worker_runs_under_its_seccomp_filter 0 '^THREAD ember-vsock seccomp 2$'
    expect an_agent_style_request_response_loop_runs_over_vsock 0 \
        '^PING conns=1 ok=1 .* rounds=1000 rtt_us_min=' '^VSOCK-PING status=0 ' \
        '^EMBER-CTRL-ALT-DEL$'
    if [ $tcp = yes ]; then
        expect the_same_transfers_over_the_tap_network_compare 0 \
            'SUMS-MATCH TCP-H2G' 'SUMS-MATCH TCP-G2H' '^TCP-PING conns=1 ok=1 .* rounds=1000'
        ip link del "$vtap" 2>/dev/null || tunctl -d "$vtap" >/dev/null 2>&1
    else
        fail the_same_transfers_over_the_tap_network_compare "cannot create the TAP $vtap here"
    fi
fi
}

e2e_snapshot() {
# A guest that counts on its console, holds a file of its data disk open, keeps a
# TCP connection from this side and listens on vsock is paused and snapshotted
# (a full snapshot), resumed, paused for a diff snapshot, and again for a second
# one, and killed (SIGKILL). Both diffs are merged onto the full snapshot's memory
# file with ember-snapshot-editor, and a new ember process restores the guest
# from the second diff's state and the merged memory. The restored guest's count
# goes on from where it stopped (the console of both processes, put together,
# counts 1, 2, 3... without a gap or a restart), it reads its file back from the
# disk, the TCP connection still carries data, ping answers, and a new vsock
# connection reaches its listener after the transport reset. The full snapshot
# is then restored on its own with its memory served by ember-uffd-handler
# through a userfaultfd, and counts on from its own count. The tools are
# beside ember.
probe=$(dirname "$ember")/ember-vsock-probe
uffd_handler=$(dirname "$ember")/ember-uffd-handler
editor=$(dirname "$ember")/ember-snapshot-editor
stap=ember-e2e2
shost_ip=169.254.80.1
sguest_ip=169.254.80.2
if ! command -v curl >/dev/null; then
    fail snapshot "curl is not installed"
elif ! [ -c /dev/net/tun ] || ! { ip tuntap add dev "$stap" mode tap 2>/dev/null || tunctl -t "$stap" >/dev/null 2>&1; }; then
    fail snapshot "cannot create the TAP $stap here"
else
    ip addr add "$shost_ip/24" dev "$stap"
    ip link set "$stap" up
    probe_size=$(wc -c <"$probe")
    cp "$guest/rootfs.ext4" "$work/snap-data.ext4"
    script_disk "$work/snap.disk" <<SCRIPT
P=/tmp/probe
dd if=/dev/vda of=\$P bs=1M skip=1 iflag=count_bytes count=$probe_size 2>/dev/null
chmod +x \$P
mkdir -p /data
mount -t ext4 /dev/vdb /data
echo "snapshot data 7f3a" >/data/hello
sync
# Held open across the snapshot.
exec 3</data/hello
ip addr add $sguest_ip/24 dev eth0
ip link set eth0 up
# stdin held open, so that nc never ends its side.
sleep 100000 | nc -l -p 7000 >/tmp/tcp &
\$P listen 5000 --echo --conns 1 >/tmp/vsock 2>&1 &
# Ready once nc listens on port 7000 (0x1B58).
until grep -q ':1B58 00000000:0000 0A' /proc/net/tcp; do sleep 0.1; done
echo SNAP-READY
i=0
while :; do
    i=\$((i + 1))
    echo "COUNT \$i TCP \$(wc -l </tmp/tcp)"
    if [ \$((i % 10)) = 0 ]; then
        echo "line \$i" >>/data/log
        sync
        echo 3 >/proc/sys/vm/drop_caches
        echo "FILE \$(cat /data/hello) HELD \$(cat /proc/self/fd/3 2>/dev/null || head -c 18 <&3)"
        echo "VSOCK \$(cat /tmp/vsock)"
        echo "NET tx \$(cat /sys/class/net/eth0/statistics/tx_packets) rx \$(cat /sys/class/net/eth0/statistics/rx_packets) \$(grep -E 'virtio|rtc' /proc/interrupts | tr -s ' ' | tr '\n' ';')"
    fi
    sleep 0.2
done
SCRIPT
    # The probe goes on the script's disk, 1 MiB in.
    truncate -s 1M "$work/snap.disk"
    cat "$probe" >>"$work/snap.disk"
    truncate -s $(((1048576 + probe_size + 511) / 512 * 512)) "$work/snap.disk"
    uds=$work/snap-v.sock
    cat >"$work/snap.json" <<JSON
{
  "boot-source": {"kernel_image_path": "$guest/vmlinux", "initrd_path": "$guest/initramfs.cpio.gz",
                  "boot_args": "$base ember.run=/dev/vda"},
  "machine-config": {"vcpu_count": 1, "mem_size_mib": 128, "track_dirty_pages": true},
  "drives": [
    {"drive_id": "script", "path_on_host": "$work/snap.disk", "is_root_device": false, "is_read_only": true},
    {"drive_id": "data", "path_on_host": "$work/snap-data.ext4", "is_root_device": false, "is_read_only": false}
  ],
  "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "$stap", "guest_mac": "02:00:a9:fe:50:02"}],
  "vsock": {"guest_cid": 3, "uds_path": "$uds"}
}
JSON
    snapshot_run() {
        rm -f "$uds" "$uds"_* "$work"/snap.state "$work"/snap.mem "$work"/diff* "$work/merged.mem"
        api_start snapshot_source --config-file "$work/snap.json"
        console_wait '^SNAP-READY' 300
        # The guest answers (its address resolved) before the connection is made.
        n=0
        until ping -c 1 -W 1 "$sguest_ip" >/dev/null 2>&1 || [ $n -ge 20 ]; do n=$((n + 1)); done
        # Lines into the guest's TCP listener, from before the snapshot to the end.
        (n=0; while [ $n -lt 600 ]; do echo "tcp $n"; n=$((n + 1)); sleep 0.2; done) |
            nc "$sguest_ip" 7000 >/dev/null 2>&1 &
        tcp_pid=$!
        console_wait '^COUNT 30 ' 120
        if ping -c 3 -W 2 "$sguest_ip" >/dev/null; then echo "PING source ok" >>"$work/host"; fi
        api GET /metrics
        grep -E '^ember_net_(rx|tx)_packets_count' "$work/api.out" | sed 's/^/SOURCE /' >>"$work/host"
        api PATCH /vm '{"state": "Paused"}'
        echo "PAUSE $code" >>"$work/host"
        t0=$(now_ms)
        api PUT /snapshot/create "{\"snapshot_path\": \"$work/snap.state\", \"mem_file_path\": \"$work/snap.mem\"}"
        echo "CREATE $code in $(($(now_ms) - t0)) ms" >>"$work/host"
        full=$(tr -d '\r' <"$work/out" | sed -n 's/^COUNT \([0-9]*\) .*/\1/p' | tail -n 1)
        # Two diffs, ten counts apart.
        mark=$full
        for d in 1 2; do
            api PATCH /vm '{"state": "Resumed"}'
            mark=$((mark + 10))
            console_wait "^COUNT $mark " 60
            api PATCH /vm '{"state": "Paused"}'
            api PUT /snapshot/create "{\"snapshot_type\": \"Diff\", \"snapshot_path\": \"$work/diff$d.state\", \"mem_file_path\": \"$work/diff$d.mem\"}"
            echo "DIFF$d $code $(du -k "$work/diff$d.mem" | cut -f1) KiB on disk" >>"$work/host"
        done
        kill -KILL "$vm"
        await "$vm" 30
        before=$(tr -d '\r' <"$work/out" | sed -n 's/^COUNT \([0-9]*\) TCP \([0-9]*\).*/\1 \2/p' | tail -n 1)
        echo "BEFORE $before" >>"$work/host"
        mv "$work/out" "$work/out-source"
        echo "DESCRIBE $("$ember" --describe-snapshot "$work/snap.state" 2>&1)" >>"$work/host"
        echo "STATE $(wc -c <"$work/snap.state") bytes, MEMORY $(wc -c <"$work/snap.mem") bytes ($(du -k "$work/snap.mem" | cut -f1) KiB on disk)" >>"$work/host"
        cp "$work/snap.mem" "$work/merged.mem"
        if "$editor" edit-memory rebase --memory-path "$work/merged.mem" --diff-path "$work/diff1.mem" &&
            "$editor" edit-memory rebase --memory-path "$work/merged.mem" --diff-path "$work/diff2.mem"; then
            echo "MERGED" >>"$work/host"
        fi

        rm -f "$uds"
        sock=$work/api2.sock
        rm -f "$sock"
        started snapshot_restore
        "$ember" --api-sock "$sock" --serial "file:$work/out" >"$work/stdout" 2>>"$work/err" </dev/null &
        socket_wait $!
        t0=$(now_ms)
        api PUT /snapshot/load "{\"snapshot_path\": \"$work/diff2.state\", \"mem_backend\": {\"backend_type\": \"File\", \"backend_path\": \"$work/merged.mem\"}, \"resume_vm\": true}"
        echo "LOAD $code in $(($(now_ms) - t0)) ms" >>"$work/host"
        last=${before%% *}
        console_wait "^COUNT $((last + 40)) " 120
        if ping -c 3 -W 2 "$sguest_ip" >/dev/null; then echo "PING restored ok" >>"$work/host"; fi
        peer_out=$("$probe" uds-connect "$uds" 5000 --ping 10 --size 64 --wait-ms 20000 2>&1 | tr '\n' ' ')
        echo "VSOCK-PEER $peer_out" >>"$work/host"
        console_wait "^VSOCK conns=1" 60
        after=$(tr -d '\r' <"$work/out" | sed -n 's/^COUNT \([0-9]*\) TCP \([0-9]*\).*/\1 \2/p' | tail -n 1)
        echo "AFTER $after" >>"$work/host"
        # The counts of both consoles, in order: 1, 2, 3... with no gap.
        if cat "$work/out-source" "$work/out" | tr -d '\r' | sed -n 's/^COUNT \([0-9]*\) .*/\1/p' |
            awk 'BEGIN { ok = 1 } $1 != NR { ok = 0 } END { exit !(ok && NR > 0) }'; then
            echo "COUNT-CONTINUES" >>"$work/host"
        fi
        if [ "${after#* }" -gt "${before#* }" ] 2>/dev/null; then echo "TCP-CONTINUES" >>"$work/host"; fi
        api GET /metrics
        grep -E '^ember_snapshot_restore' "$work/api.out" >>"$work/host"
        api PUT /actions '{"action_type": "SendCtrlAltDel"}'
        await "$vm" 120
        kill "$tcp_pid" 2>/dev/null
        wait "$tcp_pid" 2>/dev/null
        # What the tests below check is how the restored guest ended: by Ctrl+Alt+Del.
        restored_status=$status

        # The same snapshot once more, its memory served by the example page-fault
        # handler through a userfaultfd.
        mv "$work/out" "$work/out-file"
        rm -f "$uds" "$work/uffd.sock"
        "$uffd_handler" "$work/uffd.sock" "$work/snap.mem" >"$work/uffd.out" 2>&1 &
        handler=$!
        n=0
        until [ -S "$work/uffd.sock" ] || [ $n -ge 50 ]; do sleep 0.1; n=$((n + 1)); done
        sock=$work/api3.sock
        rm -f "$sock"
        started snapshot_restore_uffd
        "$ember" --api-sock "$sock" --serial "file:$work/out" >"$work/stdout" 2>>"$work/err" </dev/null &
        socket_wait $!
        api PUT /snapshot/load "{\"snapshot_path\": \"$work/snap.state\", \"mem_backend\": {\"backend_type\": \"Uffd\", \"backend_path\": \"$work/uffd.sock\"}, \"resume_vm\": true}"
        echo "UFFD-LOAD $code" >>"$work/host"
        # From the full snapshot's count: the first count after it (or the one after
        # that, when the snapshot cut the console's last line), then ten more.
        console_wait "^COUNT $((full + 10)) " 120
        if tr -d '\r' <"$work/out" | sed -n 's/^COUNT \([0-9]*\) .*/\1/p' |
            awk -v full="$full" 'NR == 1 { first = $1 }
                END { exit !((first == full + 1 || first == full + 2) && $1 >= full + 10) }'; then
            echo "UFFD-COUNTS" >>"$work/host"
        fi
        kill -KILL "$vm"
        await "$vm" 30
        # The handler ends when the VMM's socket closes.
        wait "$handler"
        echo "UFFD-HANDLER status=$? $(cat "$work/uffd.out")" >>"$work/host"
        mv "$work/out-file" "$work/out"
        status=$restored_status
    }
    retry_crashed snapshot snapshot_run
    echo "E2E INFO snapshot: $(grep -E '^(CREATE|DIFF|LOAD|STATE|BEFORE|AFTER)' "$work/host" | tr '\n' ';')"
    expect a_paused_vm_is_snapshotted_and_described 0 '^PAUSE 204' '^CREATE 204' '^DESCRIBE v1$'
    expect two_diffs_merged_onto_a_full_snapshot_restore_the_latest_state 0 '^DIFF1 204' \
        '^DIFF2 204' '^MERGED' '^LOAD 204' 'COUNT-CONTINUES'
    expect a_restored_guest_counts_on_from_where_it_stopped 0 '^LOAD 204' 'COUNT-CONTINUES'
    expect a_restored_guest_reads_its_held_file_back_from_disk 0 '^FILE snapshot data 7f3a HELD snapshot data 7f3a'
    expect a_restored_guest_keeps_its_tcp_connection_and_answers_ping 0 'TCP-CONTINUES' '^PING restored ok'
    expect a_restored_guest_takes_a_new_vsock_connection_after_the_reset 0 \
        '^VSOCK-PEER conns=1 ok=1 .*rounds=10' '^VSOCK conns=1 ok=1 sent=640 received=640'
    expect the_restore_timeline_is_in_the_metrics 0 '^ember_snapshot_restore_us [1-9]' \
        '^ember_snapshot_restore_vcpus_us '
    expect the_example_page_fault_handler_serves_a_restored_guest 0 '^UFFD-LOAD 204' \
        'UFFD-COUNTS' '^UFFD-HANDLER status=0 faults=[1-9]'
    ip link del "$stap" 2>/dev/null || tunctl -d "$stap" >/dev/null 2>&1
fi
}

# 20 clones of one snapshot at once, each on a TAP of its own through
# network_overrides and a vsock socket of its own through vsock_override: all
# run, and the pages of the memory file that they have not written are shared
# (the sum of their proportional set sizes is well below that of their RSS).
e2e_clones() {
if ! command -v curl >/dev/null; then
    fail clones "curl is not installed"
    return
fi
script_disk "$work/clone.disk" <<'SCRIPT'
ip link set eth0 up
echo CLONE-READY
i=0
while :; do
    i=$((i + 1))
    echo "TICK $i"
    sleep 5
done
SCRIPT
    cat >"$work/clone.json" <<JSON
{
  "boot-source": {"kernel_image_path": "$guest/vmlinux", "initrd_path": "$guest/initramfs.cpio.gz",
                  "boot_args": "$base ember.run=/dev/vda"},
  "machine-config": {"vcpu_count": 1, "mem_size_mib": 64},
  "drives": [
    {"drive_id": "script", "path_on_host": "$work/clone.disk", "is_root_device": false, "is_read_only": true}
  ],
  "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "ember-cl0", "guest_mac": "02:00:a9:fe:51:02"}],
  "vsock": {"guest_cid": 3, "uds_path": "$work/clone-v.sock"}
}
JSON
    clones=20
    c=0
    while [ $c -lt $clones ]; do
        ip tuntap add dev "ember-cl$c" mode tap 2>/dev/null || tunctl -t "ember-cl$c" >/dev/null 2>&1
        c=$((c + 1))
    done
    clone_source() {
        rm -f "$work/clone-v.sock"
        api_start clone_source --config-file "$work/clone.json"
        console_wait '^TICK 2$' 300
        api PATCH /vm '{"state": "Paused"}'
        api PUT /snapshot/create "{\"snapshot_path\": \"$work/clone.state\", \"mem_file_path\": \"$work/clone.mem\"}"
        echo "CLONE-CREATE $code" >>"$work/host"
        kill -KILL "$vm"
        await "$vm" 30
    }
    retry_crashed clones clone_source
    # load_clone C: a new ember for clone C, which loads the snapshot and resumes
    # it, as $vm. (socket_wait counts with $n: the clones are counted with $c.)
    load_clone() {
        sock=$work/clone$1.sock
        rm -f "$sock" "$work/clone$1-v.sock"
        "$ember" --api-sock "$sock" --serial "file:$work/clone$1.out" --id "clone$1" \
            >/dev/null 2>"$work/clone$1.err" </dev/null &
        socket_wait $!
        eval "pid$1=\$vm"
        api PUT /snapshot/load "{\"snapshot_path\": \"$work/clone.state\", \"mem_backend\": {\"backend_type\": \"File\", \"backend_path\": \"$work/clone.mem\"}, \"resume_vm\": true, \"network_overrides\": [{\"iface_id\": \"eth0\", \"host_dev_name\": \"ember-cl$1\"}], \"vsock_override\": {\"uds_path\": \"$work/clone$1-v.sock\"}}"
        [ "$code" = 204 ] && echo "CLONE $1 loaded" >>"$work/host"
        echo "E2E CLONE $1 loaded ($code) at $(cut -d" " -f1 /proc/uptime) s"
    }
    # ticking C: clone C's guest ticks on from the snapshot's count.
    ticking() {
        tr -d '\r' <"$work/clone$1.out" | grep -Eq '^TICK ([3-9]|[1-9][0-9]+)$'
    }
    t0=$(now_ms)
    c=0
    while [ $c -lt $clones ]; do
        load_clone $c
        c=$((c + 1))
    done
    echo "CLONES-STARTED $clones in $(($(now_ms) - t0)) ms" >>"$work/host"
    sleep 12
    # The nested rig's emulated SVM makes some of twenty guests on its two vCPUs
    # triple-fault, restored or not: twenty guests booted cold at once there lost
    # 5 in one run, and the rig's own kernel found its stack corrupted in another.
    # A clone whose guest did so before it ticked is loaded once more, as
    # retry_crashed does for one guest; any other ending fails the test.
    retried=
    c=0
    while [ $c -lt $clones ]; do
        eval "pid=\$pid$c"
        if ! alive "$pid" && ! ticking $c && grep -q 'The guest reset its CPUs$' "$work/clone$c.err"; then
            echo "E2E RETRY clone $c: the guest crashed (KVM_EXIT_SHUTDOWN) after $(tr -d '\r' <"$work/clone$c.out" | grep -c '^TICK') ticks"
            load_clone $c
            retried=1
        fi
        c=$((c + 1))
    done
    [ -z "$retried" ] || sleep 12
    free | sed 's/^/FREE /' >>"$work/host"
    running=0
    rss=0
    pss=0
    c=0
    while [ $c -lt $clones ]; do
        eval "pid=\$pid$c"
        if ticking $c; then
            running=$((running + 1))
        elif alive "$pid"; then
            # What a clone that runs but does not tick is doing, for the failure's report.
            echo "E2E INFO clone $c runs but does not tick: $(tail -n 5 "$work/clone$c.err" | tr '\n' ' ')"
            for task in /proc/$pid/task/*; do
                echo "E2E INFO clone $c thread $(cat "$task/comm" 2>/dev/null):" \
                    "$(sed 's/^.*) //' "$task/stat" 2>/dev/null | cut -c1) $(cat "$task/wchan" 2>/dev/null)"
            done
            tr -d '\r' <"$work/clone$c.out" | tail -n 10 | sed "s/^/E2E INFO clone $c console: /"
        fi
        if [ -r "/proc/$pid/smaps_rollup" ]; then
            rss=$((rss + $(awk '/^Rss:/ { print $2 }' "/proc/$pid/smaps_rollup")))
            pss=$((pss + $(awk '/^Pss:/ { print $2 }' "/proc/$pid/smaps_rollup")))
        else
            echo "CLONE $c ended: $(tail -n 5 "$work/clone$c.err" | tr '\n' ' ')" >>"$work/host"
            echo "E2E INFO clone $c ended: $(tail -n 5 "$work/clone$c.err" | tr '\n' ' ')"
            tr -d '\r' <"$work/clone$c.out" | tail -n 40 | sed "s/^/E2E INFO clone $c console: /"
        fi
        c=$((c + 1))
    done
    echo "CLONES-RUNNING $running" >>"$work/host"
    echo "E2E INFO snapshot clones: $clones started in $(sed -n 's/^CLONES-STARTED [0-9]* in //p' "$work/host"); per clone RSS $((rss / clones)) KiB, PSS $((pss / clones)) KiB; memory file $(du -k "$work/clone.mem" | cut -f1) KiB on disk"
    if [ $((pss * 10)) -lt $((rss * 7)) ]; then echo "CLONES-SHARE" >>"$work/host"; fi
    c=0
    while [ $c -lt $clones ]; do
        eval "kill -KILL \$pid$c 2>/dev/null"
        c=$((c + 1))
    done
    c=0
    while [ $c -lt $clones ]; do
        eval "await \$pid$c 30"
        c=$((c + 1))
    done
    status=0
    c=0
    while [ $c -lt $clones ]; do
        ip link del "ember-cl$c" 2>/dev/null || tunctl -d "ember-cl$c" >/dev/null 2>&1
        c=$((c + 1))
    done
    expect twenty_clones_of_one_snapshot_run_at_once 0 '^CLONE-CREATE 204' "^CLONES-RUNNING $clones\$"
    expect clones_share_the_pages_they_have_not_written 0 'CLONES-SHARE'
}

# The sections asked for, in their order: each prints `E2E SECTION <name>` as
# it begins, so that a run cut short (a rig that wedged) can go on from there.
for section in ${sections:-boot blk rng api net mmds jail balloon vsock snapshot clones}; do
    echo "E2E SECTION $section"
    "e2e_$section"
done

echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
