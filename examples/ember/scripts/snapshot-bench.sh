#!/bin/sh
# Snapshot timings of ember with the project's Linux guest. Runs with busybox sh
# inside the nested rig (rig.sh run ... -- sh snapshot-bench.sh ...), or with any
# POSIX sh on a host with VMX/SVM.
#
# usage: snapshot-bench.sh EMBER GUEST_DIR [RUNS]
#   EMBER      the ember binary
#   GUEST_DIR  the directory guest.sh built (vmlinux, initramfs.cpio.gz)
#   RUNS       restores and cold boots to time (default 20)
#
# For a 128 MiB and a 1 GiB guest idling in userspace: the time to create a full
# snapshot (ember's create_us), the state file's size, the memory file's size
# and what it takes on disk. Then, of the 128 MiB snapshot: RUNS restores, each
# in a new process with resume_vm, timed as ember's restore_us (VMM time from the
# request to the vCPUs resumed) and as the client sees the request; RUNS cold
# boots of the same guest to its userspace marker (ember's boot_time_us, from the
# process's start); the medians and their ratio; and how many restores one core
# makes in a second, back to back (each process started, restored, resumed and
# killed in turn). Prints `SNAPSHOT-BENCH` lines.
set -u

ember=$1
guest=$2
runs=${3:-20}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cmdline="console=ttyS0 reboot=k panic=1 pci=off quiet i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd ember.action=shell"

median() {
    tr ' ' '\n' | grep -v '^$' | sort -n | awk '{ v[NR] = $1 } END { if (NR == 0) print "none"; else print v[int((NR + 1) / 2)] }'
}

# api SOCKET METHOD PATH [BODY]: the body of the answer in $work/api.out; prints
# the status and the client's time in microseconds.
api() {
    curl -s -m 60 --unix-socket "$1" -X "$2" "http://localhost$3" \
        -H 'Content-Type: application/json' ${4:+-d "$4"} -o "$work/api.out" \
        -w '%{http_code} %{time_total}\n' | awk '{ printf "%s %d\n", $1, $2 * 1000000 }'
}

# metric NAME: its value in the last GET /metrics.
metric() { sed -n "s/^ember_$1 //p" "$work/api.out"; }

# start NAME ARGS...: ember with an API socket at $work/NAME.sock, as $pid.
start() {
    name=$1
    shift
    sock=$work/$name.sock
    rm -f "$sock"
    "$ember" --api-sock "$sock" --serial "file:$work/$name.out" "$@" \
        >/dev/null 2>"$work/$name.err" </dev/null &
    pid=$!
    n=0
    until [ -S "$sock" ] || [ $n -ge 100 ]; do sleep 0.05; n=$((n + 1)); done
}

wait_console() {
    n=0
    until grep -q "$2" "$1" 2>/dev/null || [ $n -ge 600 ]; do sleep 0.1; n=$((n + 1)); done
}

stop() { kill -KILL "$1" 2>/dev/null; wait "$1" 2>/dev/null; }

# boot_json MIB: a guest idling in its shell, with the boot timer.
boot_json() {
    cat <<JSON
{
  "boot-source": {"kernel_image_path": "$guest/vmlinux", "initrd_path": "$guest/initramfs.cpio.gz",
                  "boot_args": "$cmdline"},
  "machine-config": {"vcpu_count": 1, "mem_size_mib": $1}
}
JSON
}

for mib in 128 1024; do
    boot_json "$mib" >"$work/vm$mib.json"
    start src$mib --config-file "$work/vm$mib.json" --boot-timer
    wait_console "$work/src$mib.out" EMBER-GUEST-UP
    sleep 2
    api "$sock" PATCH /vm '{"state": "Paused"}' >/dev/null
    out=$(api "$sock" PUT /snapshot/create "{\"snapshot_path\": \"$work/s$mib.state\", \"mem_file_path\": \"$work/s$mib.mem\"}")
    api "$sock" GET /metrics >/dev/null
    echo "SNAPSHOT-BENCH create ${mib}MiB: status ${out% *}, create_us $(metric snapshot_create_us) (memory $(metric snapshot_create_memory_us) us), client $((${out#* })) us; state file $(wc -c <"$work/s$mib.state") bytes; memory file $(wc -c <"$work/s$mib.mem") bytes, $(du -k "$work/s$mib.mem" | cut -f1) KiB on disk"
    stop "$pid"
done

restores=
clients=
i=1
t0=$(cut -d' ' -f1 /proc/uptime)
while [ "$i" -le "$runs" ]; do
    start r$i
    out=$(api "$sock" PUT /snapshot/load "{\"snapshot_path\": \"$work/s128.state\", \"mem_backend\": {\"backend_type\": \"File\", \"backend_path\": \"$work/s128.mem\"}, \"resume_vm\": true}")
    api "$sock" GET /metrics >/dev/null
    us=$(metric snapshot_restore_us)
    echo "SNAPSHOT-BENCH restore $i: status ${out% *}, restore_us $us (load $(metric snapshot_restore_load_us), memory $(metric snapshot_restore_memory_us), devices $(metric snapshot_restore_devices_us), vcpus $(metric snapshot_restore_vcpus_us), resume $(metric snapshot_restore_resume_us)), client ${out#* } us"
    restores="$restores $us"
    clients="$clients ${out#* }"
    stop "$pid"
    i=$((i + 1))
done
t1=$(cut -d' ' -f1 /proc/uptime)

boots=
i=1
while [ "$i" -le "$runs" ]; do
    start b$i --config-file "$work/vm128.json" --boot-timer
    wait_console "$work/b$i.out" EMBER-GUEST-UP
    sleep 0.5
    api "$sock" GET /metrics >/dev/null
    us=$(metric vmm_boot_time_us)
    echo "SNAPSHOT-BENCH cold boot $i: boot_time_us $us"
    boots="$boots $us"
    stop "$pid"
    i=$((i + 1))
done

restore=$(echo "$restores" | median)
client=$(echo "$clients" | median)
boot=$(echo "$boots" | median)
echo "SNAPSHOT-BENCH median of $runs: restore_us $restore (client $client us); cold boot to userspace $boot us; cold boot / restore = $(awk -v a="$boot" -v b="$client" 'BEGIN { printf "%.1f", a / b }')x (client-side restore), $(awk -v a="$boot" -v b="$restore" 'BEGIN { printf "%.1f", a / b }')x (VMM restore time)"
echo "SNAPSHOT-BENCH $runs restores back to back, each in a new process started, restored, resumed and killed: $(awk -v a="$t0" -v b="$t1" -v n="$runs" 'BEGIN { printf "%.1f s, %.1f restores per second", b - a, n / (b - a) }')"
