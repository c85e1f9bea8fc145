#!/usr/bin/env bash
# ember's performance report: each measurement run side by side where it
# compares, then one table of them all.
#
#   1. start to first guest instruction, memory overhead, creation rate and
#      density, with tiny guests on this host's /dev/kvm (cargo bench -p ember
#      --bench startup);
#   2. start to guest userspace for ember and for QEMU's microvm machine, with
#      the project's Linux guest (boot-compare.sh), inside the nested rig where
#      /dev/kvm has no VMX/SVM;
#   3. the API: start to socket accepting, and request latency (cargo bench -p
#      ember --bench api);
#   4. guest-visible disk and TCP throughput for ember and for QEMU's microvm
#      machine (io-compare.sh), in the rig likewise.
#
# usage: bench.sh [RUNS]   RUNS: boots of each VMM in step 2 (default 5)
#
# The table at the end is what docs/performance.md records, with the date and
# the machine.
set -euo pipefail
scripts=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$scripts/../../.." && pwd)
runs=${1:-5}
cd "$root"
log=$(mktemp)
trap 'rm -f "$log"' EXIT

"$scripts/deps.sh"

echo "==> cargo bench -p ember --bench startup"
cargo bench --locked -p ember --bench startup | tee -a "$log"

echo "==> cargo bench -p ember --bench api"
cargo bench --locked -p ember --bench api | tee -a "$log"

echo "==> boot to userspace: ember and QEMU microvm, $runs boots each"
cargo build --release --locked -p ember -p ember-io-probe -p ember-vsock-probe
release=$root/target/x86_64-unknown-linux-gnu/release
ember=$release/ember
guest=$("$scripts/guest.sh" | tail -n 1)
where="on this host"
if "$scripts/rig.sh" needed; then
    where="in the nested rig (software emulation: only the ratio means something)"
    echo "bench.sh: comparing inside the nested rig (software emulation: compare only the ratio)"
    "$scripts/rig.sh" run --qemu --add "$ember:/usr/local/bin/ember" --add "$guest" \
        --add "$scripts/boot-compare.sh:/boot-compare.sh" \
        --add "$scripts/boot-time.sh:/boot-time.sh" -- \
        sh /boot-compare.sh /usr/local/bin/ember "$guest" "$runs" | tee -a "$log"
else
    sh "$scripts/boot-compare.sh" "$ember" "$guest" "$runs" | tee -a "$log"
fi

echo "==> guest disk and TCP throughput: ember and QEMU microvm"
if "$scripts/rig.sh" needed; then
    # The data disk's image on ext4, as a host keeps it (io-compare.sh).
    mkfs=$(PATH=$PATH:/usr/sbin:/sbin command -v mkfs.ext4)
    losetup=$(PATH=$PATH:/usr/sbin:/sbin command -v losetup)
    "$scripts/rig.sh" run --qemu --module ext4 --module loop --module crc32c_generic \
        --add "$mkfs" --add "$losetup:/usr/local/bin/losetup" \
        --add "$ember:/usr/local/bin/ember" \
        --add "$release/ember-io-probe:/usr/local/bin/ember-io-probe" \
        --add "$release/ember-vsock-probe:/usr/local/bin/ember-vsock-probe" --add "$guest" \
        --add "$scripts/io-compare.sh:/io-compare.sh" \
        --add "$scripts/boot-time.sh:/boot-time.sh" -- \
        DATA_FS=ext4 sh /io-compare.sh /usr/local/bin/ember "$guest" | tee -a "$log"
else
    sh "$scripts/io-compare.sh" "$ember" "$guest" | tee -a "$log"
fi

# The report: each row's value is cut from the lines above.
# pick PATTERN REGEX REPLACEMENT: the last line matching PATTERN, rewritten.
pick() { tr -d '\r' <"$log" | grep -a "$1" | tail -n 1 | sed -n "s|$2|$3|p"; }
first=$(pick '^start to first guest instruction' '.*median \([0-9]*\) us.*' '\1')
overhead=$(pick '^memory overhead' '.*median \([0-9]*\) KiB.*' '\1')
rate=$(pick '^creation rate' '.*, \([0-9]*\) per second per core.*' '\1')
density='.*: \([0-9]*\) running at once, stopped by \([^;]*\);.*(\([0-9]*\) KiB per microVM).*'
density_off=$(pick '^density .*KSM off' "$density" '\1 (stopped by \2), \3 KiB each')
density_on=$(pick '^density .*KSM on' "$density" '\1 (stopped by \2), \3 KiB each')
ember_boot=$(pick '^BOOT-COMPARE ember median' '.*ember median=\([0-9.]*\)s.*' '\1')
qemu_boot=$(pick '^BOOT-COMPARE ember median' '.*qemu median=\([0-9.]*\)s.*' '\1')
ratio=$(pick '^BOOT-COMPARE ember median' '.* ratio=\([0-9.]*\).*' '\1')
api_start=$(pick '^start to API socket' '.*median \([0-9.]*\) ms wall.*median \([0-9.]*\) ms CPU.*' \
    '\1 ms wall, \2 ms CPU')
latency='.*median \([0-9.]*\) us, p99 \([0-9.]*\) us.*'
api_get=$(pick '^GET /machine-config' "$latency" '\1 us, p99 \2 us')
api_patch=$(pick '^PATCH /vm' "$latency" '\1 us, p99 \2 us')

cat <<TABLE

## ember performance report, $(date -u +%Y-%m-%d), $(nproc) cores, $(uname -r)

| measurement | ember | target or reference |
| --- | --- | --- |
| start to first guest instruction (tiny guest, 128 MiB, median of 20) | ${first:-?} us | <= 5000 us |
| VMM memory overhead (RSS minus guest pages, median of 5) | ${overhead:-?} KiB | <= 2048 KiB |
| creation rate (32 MiB, 1 vCPU, to first instruction) | ${rate:-?} per second per core | |
| density, KSM off (idle, 32 MiB; host memory per microVM) | ${density_off:-?} | |
| density, KSM on | ${density_on:-?} | |
| start to guest userspace, $where | ${ember_boot:-?} s (QEMU microvm ${qemu_boot:-?} s) | ratio ${ratio:-?}, <= 0.8 |
| start to API socket accepting (median of 20) | ${api_start:-?} | Firecracker about 12 ms wall, 8 ms CPU |
| GET /machine-config (1000 requests) | median ${api_get:-?} | |
| PATCH /vm, guest running (1000 requests) | median ${api_patch:-?} | |
TABLE

echo
echo "Guest I/O, $where (ember Sync and Async engines beside QEMU; ratios to QEMU):"
tr -d '\r' <"$log" | grep -a '^IO-COMPARE [a-z]' | grep -v '^IO-COMPARE run ' | sed 's/^IO-COMPARE /- /'
