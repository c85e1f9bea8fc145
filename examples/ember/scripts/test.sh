#!/usr/bin/env bash
# The whole test suite: unit tests, vCPU tests on /dev/kvm, ember with tiny
# guests, the fuzz targets' corpus, then the end-to-end tests that boot the
# project's Linux guest (inside the nested rig where /dev/kvm has no VMX/SVM).
set -euo pipefail
scripts=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$scripts/../../.." && pwd)
cd "$root"

"$scripts/deps.sh"

echo "==> cargo test --workspace"
cargo test --workspace --locked

echo "==> fuzz corpus replay (cargo test in fuzz/)"
cargo test --locked --manifest-path fuzz/Cargo.toml

# watch_console PID FILE SECONDS: stops the rig that rig.sh PID runs (through its
# `timeout`, which passes the signal on to QEMU; rig.sh then fails with 125) once
# FILE, its console, has not grown for SECONDS, or once the rig's kernel reports
# a CPU stuck for a minute or more: a soft lockup, in which the emulated SVM no
# longer gives the rig's kernel that CPU back from a guest, and the console
# grows with the kernel's reports of it alone.
watch_console() {
    while kill -0 "$1" 2>/dev/null; do
        sleep 5
        if [ $(($(date +%s) - $(stat -c %Y "$2"))) -ge "$3" ]; then
            echo "test.sh: the rig's console has been silent for $3 s: stopping the rig"
            pkill -TERM -P "$1" -x timeout || true
            return
        fi
        if grep -Eq 'soft lockup - CPU#[0-9]+ stuck for ([6-9][0-9]|[0-9]{3,})s' "$2"; then
            echo "test.sh: a CPU of the rig has been stuck for a minute: stopping the rig"
            pkill -TERM -P "$1" -x timeout || true
            return
        fi
    done
}

echo "==> end-to-end tests with the Linux guest"
cargo build --release --locked -p ember -p ember-vsock-probe -p ember-uffd-handler
ember=$root/target/x86_64-unknown-linux-gnu/release/ember
jailer=$root/target/x86_64-unknown-linux-gnu/release/ember-jailer
# Both ends of the vsock tests; e2e.sh finds it beside ember.
probe=$root/target/x86_64-unknown-linux-gnu/release/ember-vsock-probe
# The page-fault handler a snapshot's memory is restored through; beside ember too.
uffd_handler=$root/target/x86_64-unknown-linux-gnu/release/ember-uffd-handler
# Merges diff snapshots onto a full one; beside ember too.
editor=$root/target/x86_64-unknown-linux-gnu/release/ember-snapshot-editor
guest=$("$scripts/guest.sh" | tail -n 1)
# in_rig SMP SECTIONS: runs the sections of e2e.sh in the nested rig with SMP
# vCPUs; returns the number of tests that failed (0 when all passed), or the
# rig's status when it failed five times.
#
# The rig gets one vCPU: with two, its kernel panicked in about half of the full
# runs (a stack overflow in error_entry, or a corrupted stack end, on a vCPU
# thread, in emulated SVM), and under the clones' twenty guests it also made
# guests triple-fault, restored or booted cold alike. With one it has not, in
# the runs since; the clones section takes about twice as long there.
# Transparent huge pages are off in the rig: its emulated SVM has wedged with
# huge second-level pages under the guests' 2 MiB-aligned RAM, and the tests
# check devices, not how RAM is backed. It wedged, in about one guest start in
# 30 and in most runs of the clones section: the rig's timer interrupt was lost,
# no timer of the rig's kernel was armed in QEMU again (its next deadline the
# RTC's, at midnight) and nothing in the rig ran any more; idle=poll in the rig
# did not help. The rig's kernel now ticks periodically (rig.sh), so that its
# timer re-arms itself. Should it wedge still, a rig whose console stays silent
# for $stall seconds is stopped (the longest quiet stretch of a run that goes
# well is about two minutes), as is one whose kernel reports a CPU stuck for a
# minute (seen once with the clones' twenty guests on two vCPUs). A rig that is stopped or hangs
# (124), dies without a status (125) or holds an ember that SIGKILL cannot end
# (3, a fault of the nested KVM) is booted again, up to five times in all, and
# that is printed: for the sections of e2e.sh from the one it stopped in, as
# what the sections before it found stands. Failing tests are not retried.
in_rig() {
    local smp=$1 sections=$2 earlier=0 attempt rc rig watcher last rest from section failures
    for attempt in 1 2 3 4 5; do
        echo "test.sh: running the end-to-end tests ($sections) inside the nested rig"
        rc=0
        "$scripts/rig.sh" run --smp "$smp" --timeout 900 --add "$ember:/usr/local/bin/ember" \
            --add "$jailer:/usr/local/bin/ember-jailer" --add "$guest" \
            --add "$probe:/usr/local/bin/ember-vsock-probe" \
            --add "$uffd_handler:/usr/local/bin/ember-uffd-handler" \
            --add "$editor:/usr/local/bin/ember-snapshot-editor" \
            --add "$(command -v curl):/usr/bin/curl" --add "$(command -v ip):/usr/local/sbin/ip" \
            --add "$scripts/e2e.sh:/e2e.sh" \
            --add "$scripts/off-initramfs.sh:/off-initramfs.sh" \
            -- echo never '>/sys/kernel/mm/transparent_hugepage/enabled;' \
            sh /e2e.sh /usr/local/bin/ember "$guest" "$sections" > >(tee "$console") 2>&1 &
        rig=$!
        watch_console "$rig" "$console" "$stall" &
        watcher=$!
        wait "$rig" || rc=$?
        kill "$watcher" 2>/dev/null || true
        wait "$watcher" 2>/dev/null || true
        case "$rc" in
        3 | 124 | 125)
            last=$(tr -d '\r' <"$console" | sed -n 's/^E2E SECTION //p' | tail -n 1)
            if [ -n "$last" ]; then
                # Failures of the sections that ran to their end.
                earlier=$((earlier + $(tr -d '\r' <"$console" |
                    awk '/^E2E SECTION / { before = failed } /^E2E FAIL / { failed++ } END { print before + 0 }')))
                rest=
                from=false
                for section in $sections; do
                    [ "$section" = "$last" ] && from=true
                    ! $from || rest="$rest $section"
                done
                sections=${rest# }
            fi
            [ "$attempt" = 5 ] || echo "test.sh: the rig failed (status $rc), not a test: booting it again"
            ;;
        0)
            return "$earlier"
            ;;
        *)
            # e2e.sh exits 1 when a test failed; its failures are in the console
            # (at least one, whatever the console says).
            failures=$(tr -d '\r' <"$console" | grep -c '^E2E FAIL ' || true)
            return $((earlier + (failures > 0 ? failures : 1)))
            ;;
        esac
    done
    echo "test.sh: the rig failed five times (last status $rc)"
    return $((earlier + 1))
}

if "$scripts/rig.sh" needed; then
    stall=${EMBER_RIG_STALL:-240}
    console=$(mktemp)
    trap 'rm -f "$console"' EXIT
    failed=0
    in_rig 1 "boot blk rng api net mmds jail balloon vsock snapshot" || failed=$?
    in_rig 1 "clones" || failed=$((failed + $?))
    if [ "$failed" -gt 0 ]; then
        echo "test.sh: $failed end-to-end test(s) failed, or the rig failed"
        exit 1
    fi
else
    sh "$scripts/e2e.sh" "$ember" "$guest"
fi
