#!/usr/bin/env bash
# ember's measurements, each run side by side where it compares:
#
#   1. start to first guest instruction and memory overhead, with tiny guests on
#      this host's /dev/kvm (cargo bench -p ember --bench startup);
#   2. start to guest userspace for ember and for QEMU's microvm machine, with
#      the project's Linux guest (boot-compare.sh), inside the nested rig where
#      /dev/kvm has no VMX/SVM.
#
# usage: bench.sh [RUNS]   RUNS: boots of each VMM in step 2 (default 5)
set -euo pipefail
scripts=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$scripts/../../.." && pwd)
runs=${1:-5}
cd "$root"

"$scripts/deps.sh"

echo "==> cargo bench -p ember --bench startup"
cargo bench --locked -p ember --bench startup

echo "==> boot to userspace: ember and QEMU microvm, $runs boots each"
cargo build --release --locked -p ember
ember=$root/target/x86_64-unknown-linux-gnu/release/ember
guest=$("$scripts/guest.sh" | tail -n 1)
if "$scripts/rig.sh" needed; then
    echo "bench.sh: comparing inside the nested rig (software emulation: compare only the ratio)"
    "$scripts/rig.sh" run --qemu --add "$ember:/usr/local/bin/ember" --add "$guest" \
        --add "$scripts/boot-compare.sh:/boot-compare.sh" -- \
        sh /boot-compare.sh /usr/local/bin/ember "$guest" "$runs"
else
    sh "$scripts/boot-compare.sh" "$ember" "$guest" "$runs"
fi
