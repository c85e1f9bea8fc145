#!/bin/sh
# End-to-end tests of ember with the project's Linux guest. Runs with busybox sh
# inside the nested rig, or with any POSIX sh on a host with VMX/SVM.
#
# usage: e2e.sh EMBER GUEST_DIR
#   EMBER      the ember binary
#   GUEST_DIR  the directory guest.sh built (vmlinux, bzImage, initramfs.cpio.gz)
#
# Prints `E2E PASS <name>` or `E2E FAIL <name>` per test, then `N passed, N failed`;
# exits non-zero when a test failed.
set -u

ember=$1
guest=$2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
passed=0
failed=0
base="console=ttyS0 reboot=k panic=1 pci=off"

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
    echo "----"
    failed=$((failed + 1))
}

# boot NAME ARGS...: runs ember with a time limit; console in $work/out, log in
# $work/err, exit status in $status.
boot() {
    name=$1
    shift
    timeout 300 "$ember" --serial "file:$work/out" "$@" >"$work/stdout" 2>"$work/err" </dev/null
    status=$?
    : >>"$work/out"
}

# expect NAME STATUS PATTERN...: the last boot exited with STATUS and its
# console holds each PATTERN (grep -E), each on a line.
expect() {
    name=$1
    want=$2
    shift 2
    if [ "$status" != "$want" ]; then
        fail "$name" "exit status $status, expected $want"
        return 1
    fi
    for pattern in "$@"; do
        if ! grep -Eq "$pattern" "$work/out" "$work/err"; then
            fail "$name" "no line matching '$pattern'"
            return 1
        fi
    done
    pass "$name"
}

fresh() { rm -f "$work/out" "$work/err" "$work/stdout"; }

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

echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
