#!/bin/sh
# Host-to-guest TCP, many transfers per boot, ember beside QEMU's microvm
# machine: the test that finds how often a guest stops during the transfer.
# Runs with busybox sh inside the nested rig (rig.sh --qemu), or with any POSIX
# sh on a host with VMX/SVM; needs root, /dev/net/tun and `ip`, and boot-time.sh
# beside it.
#
# usage: h2g-stress.sh EMBER GUEST_DIR [TRANSFERS] [BOOTS]
#   EMBER      the ember binary; ember-io-probe and ember-vsock-probe beside it
#   GUEST_DIR  the directory guest.sh built (vmlinux, initramfs.cpio.gz)
#   TRANSFERS  64 MiB transfers per boot (default 30)
#   BOOTS      boots of each VMM, alternating, ember first (default 3)
#
# Prints one line per boot, `H2G-STRESS <vmm> transfers=<done>/<asked>
# secs=<s> mib_s: <each transfer's rate>`, and for a guest that stopped before
# its last transfer the tails of its console and of the VMM's log (ember's
# says how the guest left: "vCPU 0 triple-faulted: ..." for a triple fault).
# Ends with `H2G-STRESS <vmm> boots=<n> stopped=<m> transfers=<t>` for each.
#
# With TRACE=1 in the environment (and tracefs in the kernel), KVM's exits,
# injected events, page faults and MMIO accesses are traced, and a stopped
# guest's last 40 events are printed: what the vCPU did before it stopped.
set -u

ember=$1
guest=$2
transfers=${3:-30}
boots=${4:-3}
bin=$(dirname "$ember")
work=$(mktemp -d)
. "$(dirname "$0")/boot-time.sh"
tap=ember-h2g0
host_ip=169.254.81.1
guest_ip=169.254.81.2
mac=02:00:a9:fe:51:02
trap 'ip link del "$tap" 2>/dev/null; rm -rf "$work"' EXIT

{ ip tuntap add dev "$tap" mode tap 2>/dev/null || tunctl -t "$tap" >/dev/null; } || exit 1
ip addr add "$host_ip/24" dev "$tap"
ip link set "$tap" up

(cd "$bin" && tar -cf "$work/tools.disk" ember-vsock-probe) || exit 1
truncate -s 16M "$work/tools.disk"
cat >"$work/script.disk" <<SCRIPT
disk() { for d in /sys/block/vd*; do [ "\$(cat \$d/serial 2>/dev/null)" = "\$1" ] && echo /dev/\${d##*/}; done; }
mkdir -p /tmp/tools
tar -xf "\$(disk tools)" -C /tmp/tools
ip addr add $guest_ip/24 dev eth0
ip link set eth0 up
i=1
while [ \$i -le $transfers ]; do
    echo "H2G-RESULT \$(/tmp/tools/ember-vsock-probe tcp-listen 5202 --recv --timeout-ms 30000 2>&1)"
    i=\$((i + 1))
done
SCRIPT
printf '\nexit\n' >>"$work/script.disk"
truncate -s 1M "$work/script.disk"

cmdline="console=ttyS0 panic=1 pci=off quiet i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd ember.run=/dev/vda"
cat >"$work/ember.json" <<JSON
{
  "boot-source": {"kernel_image_path": "$guest/vmlinux", "initrd_path": "$guest/initramfs.cpio.gz",
                  "boot_args": "$cmdline reboot=k"},
  "machine-config": {"vcpu_count": 1, "mem_size_mib": 256},
  "drives": [
    {"drive_id": "script", "path_on_host": "$work/script.disk", "is_root_device": false, "is_read_only": true},
    {"drive_id": "tools", "path_on_host": "$work/tools.disk", "is_root_device": false, "is_read_only": true}
  ],
  "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "$tap", "guest_mac": "$mac"}]
}
JSON

trace=
if [ -n "${TRACE:-}" ]; then
    trace=/sys/kernel/tracing
    [ -d "$trace/events" ] || mount -t tracefs nodev "$trace" || exit 1
    echo 4096 >"$trace/buffer_size_kb"
    for event in kvm_exit kvm_inj_exception kvm_inj_virq kvm_page_fault kvm_emulate_insn kvm_mmio; do
        echo 1 >"$trace/events/kvm/$event/enable"
    done
fi

: >"$work/boots"
# run NAME COMMAND...: boots one VMM with the host's senders beside it.
run() {
    name=$1
    shift
    # The sender in flight goes with the loop, so that none outlives its guest and
    # connects to the next one.
    (
        probe=
        trap '[ -z "$probe" ] || kill "$probe" 2>/dev/null; exit' TERM
        i=1
        while [ $i -le "$transfers" ]; do
            "$bin/ember-vsock-probe" tcp-connect "$guest_ip:5202" --send 64M --wait-ms 30000 \
                --timeout-ms 30000 >/dev/null 2>&1 &
            probe=$!
            wait "$probe"
            i=$((i + 1))
        done
    ) &
    sender=$!
    [ -z "$trace" ] || echo >"$trace/trace"
    start=$(date +%s)
    "$@" >"$work/console" 2>"$work/stderr" </dev/null
    secs=$(($(date +%s) - start))
    kill "$sender" 2>/dev/null
    wait "$sender" 2>/dev/null
    done=$(tr -d '\r' <"$work/console" | grep -c '^H2G-RESULT .*ok=1')
    rates=$(tr -d '\r' <"$work/console" | sed -n 's/^H2G-RESULT.*mib_s=\([0-9.]*\).*/\1/p' | tr '\n' ' ')
    echo "H2G-STRESS $name transfers=$done/$transfers secs=$secs mib_s: $rates"
    echo "$name $done" >>"$work/boots"
    if [ "$done" != "$transfers" ]; then
        tail -n 5 "$work/console" "$work/stderr"
        if [ -n "$trace" ]; then
            echo "H2G-STRESS $name: the last KVM events"
            tail -n 40 "$trace/trace"
        fi
    fi
}

b=1
while [ $b -le "$boots" ]; do
    run ember "$ember" --no-api --config-file "$work/ember.json"
    run qemu qemu_microvm 256 "$cmdline reboot=t" \
        -drive "id=script,file=$work/script.disk,format=raw,if=none,readonly=on" \
        -device virtio-blk-device,drive=script,serial=script \
        -drive "id=tools,file=$work/tools.disk,format=raw,if=none,readonly=on" \
        -device virtio-blk-device,drive=tools,serial=tools \
        -netdev "tap,id=net0,ifname=$tap,script=no,downscript=no" \
        -device "virtio-net-device,netdev=net0,mac=$mac"
    b=$((b + 1))
done

for name in ember qemu; do
    awk -v n="$name" -v t="$transfers" '$1 == n { boots++; done += $2; if ($2 < t) stopped++ }
        END { printf "H2G-STRESS %s boots=%d stopped=%d transfers=%d\n", n, boots, stopped, done }' \
        "$work/boots"
done
