#!/usr/bin/env bash
# Boots a microVM with the default guest (Linux 6.1 and a busybox initramfs, built
# from Debian packages on first use) and puts its console on this terminal.
#
# usage: run.sh [EMBER ARGS...]   extra arguments go to ember, e.g. --vcpus 2
#
# Where /dev/kvm has VMX/SVM, ember runs directly. Elsewhere it runs inside the
# nested rig (see rig.sh), which this script says when it does.
set -euo pipefail
scripts=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$scripts/../../.." && pwd)

"$scripts/deps.sh"
echo "run.sh: building ember" >&2
(cd "$root" && cargo build --release --locked -p ember)
ember=$root/target/x86_64-unknown-linux-gnu/release/ember
guest=$("$scripts/guest.sh" | tail -n 1)
args=(--kernel "$guest/vmlinux" --initrd "$guest/initramfs.cpio.gz" --boot-timer
    --cmdline "console=ttyS0 reboot=k panic=1 pci=off i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd ember.action=shell" "$@")

if "$scripts/rig.sh" needed >&2; then
    echo "run.sh: this host's KVM has no VMX/SVM: running ember inside the nested rig" >&2
    # The rig runs its command with sh -c: quote each argument for it.
    quoted=
    for arg in "${args[@]}"; do
        quoted+=" '${arg//\'/\'\\\'\'}'"
    done
    exec "$scripts/rig.sh" shell --add "$ember:/usr/local/bin/ember" --add "$guest" -- "ember$quoted"
fi
exec "$ember" "${args[@]}"
