#!/usr/bin/env bash
# The nested test rig: a real KVM for hosts whose /dev/kvm has no VMX/SVM.
#
# QEMU in software emulation (TCG) runs an AMD EPYC CPU with SVM and Debian's
# own kernel (linux-image-amd64, downloaded and unpacked, not installed) with
# kvm-amd and tun loaded, from an initramfs carrying busybox, the files given
# with --add and, with --qemu, qemu-system-x86_64 for `-M microvm`. A command
# runs inside with `sh -c` and its exit status comes back as this script's.
# The rig is test infrastructure: ember never depends on it, and inside it
# everything runs at emulation speed, so compare timings only side by side.
#
# usage:
#   rig.sh run [OPTIONS] -- COMMAND...   run COMMAND in the rig, stream its console
#                                        to stdout, exit with COMMAND's status
#   rig.sh shell [OPTIONS] [-- COMMAND...]
#                                        the same with the console on this terminal
#                                        (default COMMAND: sh); Ctrl-A x quits QEMU
#   rig.sh build [--qemu]                build the cached rig, print its directory
#   rig.sh needed                        exit 0 (and say why) when this host's KVM
#                                        cannot boot Linux and the rig is needed
#
# OPTIONS:
#   --add HOST[:RIG]   copy a file or directory into the rig at RIG (default: the
#                      absolute HOST path, so paths work unchanged inside); the
#                      ldd libraries of dynamic executables in it come along
#   --qemu             add qemu-system-x86_64, its libraries and the microvm firmware
#   --module NAME      also load this module of the rig kernel (with dependencies)
#   --mem MiB          memory of the rig (default 2048)
#   --smp N            vCPUs of the rig (default 2)
#   --timeout SECONDS  stop the rig after this long and fail (default 1200 for
#                      run, none for shell; EMBER_RIG_TIMEOUT overrides the default)
#   -it                with run: same as shell
#
# COMMAND is joined with spaces and run by busybox sh (as ssh does), in the
# current directory's path when it exists in the rig, else in /. Batch runs get
# stdin from /dev/null. The console shows `EMBER-RIG-UP uptime=<s>` when the
# rig is ready and `EMBER-RIG-EXIT <status>` when COMMAND ends; a rig that
# stops without that line, or runs out of time, fails with status 125 or 124.
#
# Cache: ${EMBER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ember}/rig-<hash> (kernel,
# modules, base initramfs) and rig-qemu-<hash> (the --qemu payload), keyed by
# this script and the Debian package versions.
set -euo pipefail

scripts_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
self=$scripts_dir/$(basename "${BASH_SOURCE[0]}")
busybox=/bin/busybox
qemu_bin=/usr/bin/qemu-system-x86_64
# Loaded at boot, dependencies first (resolved from the modules themselves).
base_modules=(kvm_amd tun)
# The firmware and option ROMs QEMU's microvm machine may ask for.
qemu_data=(bios-microvm.bin qboot.rom pvh.bin linuxboot_dma.bin linuxboot.bin kvmvapic.bin)

say() { printf 'rig.sh: %s\n' "$*" >&2; }
die() {
    printf 'rig.sh: error: %s\n' "$*" >&2
    exit 1
}
usage() {
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$self"
}

cache_root=${EMBER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ember}
checksum() { sha256sum | cut -c1-64; }
pkg_version() { dpkg-query -W -f='${Version}' "$1"; }

# --- the cached rig: kernel, modules, base initramfs ------------------------

# The init of the rig. Reads what rig.sh put in /rig: cmd, cwd, mode, modules,
# ttysize.
rig_init() {
    cat <<'EOF'
#!/bin/sh
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
mkdir -p /dev/pts /dev/shm /tmp /run /root
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /run
# /tmp stays on the initramfs (itself a tmpfs), where added files may live.
chmod 1777 /tmp

fail() {
    echo "rig: $*"
    printf '\nEMBER-RIG-EXIT 125\n'
    poweroff -f
    sleep 3600
}

for m in $(cat /rig/modules); do
    insmod "$m" || fail "insmod $m failed"
done
[ -e /dev/kvm ] || mknod /dev/kvm c 10 232
[ -e /dev/net/tun ] || { mkdir -p /dev/net && mknod /dev/net/tun c 10 200; }
[ "$(grep -c -w svm /proc/cpuinfo)" -gt 0 ] || fail "the rig's CPU has no SVM flag"
[ -c /dev/kvm ] || fail "no /dev/kvm after loading kvm_amd"
ip link set lo up
hostname ember-rig

cmd=$(cat /rig/cmd)
cd "$(cat /rig/cwd)" 2>/dev/null || cd /
printf '\nEMBER-RIG-UP uptime=%s\n' "$(cut -d' ' -f1 /proc/uptime)"
if [ "$(cat /rig/mode)" = interactive ]; then
    size=$(cat /rig/ttysize 2>/dev/null)
    [ -z "$size" ] || stty -F /dev/console rows "${size% *}" cols "${size#* }" 2>/dev/null
    setsid cttyhack sh -c "$cmd"
    status=$?
else
    stty -F /dev/console -onlcr 2>/dev/null
    sh -c "$cmd" </dev/null
    status=$?
    stty -F /dev/console onlcr 2>/dev/null
fi
sync
printf '\nEMBER-RIG-EXIT %s\n' "$status"
poweroff -f
sleep 3600
EOF
}

# Prints the Debian package that linux-image-amd64 points at, and its version.
kernel_package() {
    local dep
    dep=$(apt-cache show --no-all-versions linux-image-amd64 2>/dev/null |
        sed -n 's/^Depends: .*\(linux-image-[^ ,]*\) (= \([^)]*\)).*/\1 \2/p' | head -1)
    [ -n "$dep" ] || die "apt-cache knows no linux-image-amd64; run 'apt-get update' as root."
    printf '%s\n' "$dep"
}

# Downloads a Debian package (name=version) into a directory.
download() {
    local spec=$1 dest=$2 dl
    dl=$(mktemp -d)
    # Lets apt's unprivileged downloader write there.
    chmod 0777 "$dl"
    if ! (cd "$dl" && apt-get download -q "$spec" >&2 2>&1); then
        [ "$(id -u)" -eq 0 ] || die "apt-get download $spec failed; run 'apt-get update' as root."
        say "refreshing the package lists"
        apt-get update -q >&2 || die "apt-get update failed."
        (cd "$dl" && apt-get download -q "$spec" >&2 2>&1) || die "apt-get download $spec failed."
    fi
    mv "$dl"/*.deb "$dest/"
    rm -rf "$dl"
}

# Builds `find | cpio` of a directory as root-owned newc, uncompressed: the
# kernel unpacks it fast, where decompression under TCG would take seconds.
pack() {
    (cd "$1" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet)
}

# Prints the module files (relative to the modules tree) for NAMEs, each after
# its dependencies, each once.
resolve_modules() {
    local tree=$1
    shift
    local -A path=() seen=()
    local f n
    while IFS= read -r f; do
        n=$(basename "$f" .ko)
        path[${n//-/_}]=$f
    done < <(cd "$tree" && find kernel -name '*.ko')
    visit() {
        local name=${1//-/_} dep deps
        [ -z "${seen[$name]:-}" ] || return 0
        seen[$name]=1
        [ -n "${path[$name]:-}" ] || die "the rig kernel has no module '$1'."
        deps=$(grep -a -o -m1 'depends=[a-z0-9_,-]*' "$tree/${path[$name]}" | head -1)
        deps=${deps#depends=}
        for dep in ${deps//,/ }; do visit "$dep"; done
        printf '%s\n' "${path[$name]}"
    }
    for n in "$@"; do visit "$n"; done
}

build_rig() {
    local pkg ver hash out tmp deb kver dep
    dep=$(kernel_package)
    pkg=${dep% *}
    ver=${dep#* }
    hash=$(printf '%s\n' "script $(checksum <"$self")" "$pkg $ver" \
        "busybox-static $(pkg_version busybox-static)" | sha256sum | cut -c1-16)
    out=$cache_root/rig-$hash
    if [ ! -d "$out" ]; then
        mkdir -p "$cache_root"
        exec 8>"$cache_root/.rig.lock"
        flock 8
    fi
    if [ ! -d "$out" ]; then
        tmp=$(mktemp -d "$cache_root/.rig-$hash.XXXXXX")
        # shellcheck disable=SC2064 # expand now: tmp is local
        trap "rm -rf '$tmp'" EXIT
        say "building the rig ($pkg $ver) in $tmp"
        download "$pkg=$ver" "$tmp"
        deb=$(echo "$tmp"/*.deb)
        mkdir "$tmp/x" "$tmp/out"
        dpkg-deb -x "$deb" "$tmp/x"
        kver=$(basename "$(echo "$tmp"/x/lib/modules/*)")
        [ -d "$tmp/x/lib/modules/$kver/kernel" ] || die "$deb holds no kernel modules."
        cp "$tmp/x/boot/vmlinuz-$kver" "$tmp/out/vmlinuz"
        mv "$tmp/x/lib/modules/$kver" "$tmp/out/modules"
        printf '%s\n' "$kver" >"$tmp/out/kernel-release"

        local root=$tmp/root m
        mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,run,root,etc,rig} "$root/lib/modules/$kver"
        cp "$busybox" "$root/bin/busybox"
        "$busybox" --list-full | grep -v -x -E 'sbin/init|linuxrc|bin/busybox' |
            while IFS= read -r m; do ln -s /bin/busybox "$root/$m"; done
        rig_init >"$root/init"
        chmod 0755 "$root/init"
        resolve_modules "$tmp/out/modules" "${base_modules[@]}" >"$tmp/modules"
        : >"$tmp/out/modules.list"
        while IFS= read -r m; do
            mkdir -p "$root/lib/modules/$kver/$(dirname "$m")"
            cp "$tmp/out/modules/$m" "$root/lib/modules/$kver/$m"
            printf '/lib/modules/%s/%s\n' "$kver" "$m" >>"$tmp/out/modules.list"
        done <"$tmp/modules"
        pack "$root" >"$tmp/out/base.cpio"
        rm -rf "$tmp/x" "$root" "$deb"
        mv -T "$tmp/out" "$out"
        rm -rf "$tmp"
        trap - EXIT
        say "rig ready: $out"
    fi
    exec 8>&-
    rig_dir=$out
}

build_qemu_payload() {
    local hash out tmp root f lib
    hash=$(printf '%s\n' "script $(checksum <"$self")" \
        "qemu-system-x86 $(pkg_version qemu-system-x86)" "libc6 $(pkg_version libc6)" |
        sha256sum | cut -c1-16)
    out=$cache_root/rig-qemu-$hash
    if [ ! -d "$out" ]; then
        mkdir -p "$cache_root"
        exec 8>"$cache_root/.rig.lock"
        flock 8
    fi
    if [ ! -d "$out" ]; then
        tmp=$(mktemp -d "$cache_root/.rig-qemu-$hash.XXXXXX")
        # shellcheck disable=SC2064 # expand now: tmp is local
        trap "rm -rf '$tmp'" EXIT
        say "packing qemu-system-x86_64 for the rig"
        root=$tmp/root
        mkdir -p "$root/usr/bin" "$root/usr/share/qemu" "$tmp/out"
        cp "$qemu_bin" "$root/usr/bin/"
        while IFS= read -r lib; do
            mkdir -p "$root$(dirname "$lib")"
            cp -L "$lib" "$root$lib"
        done < <(libraries "$qemu_bin")
        for f in "${qemu_data[@]}"; do
            [ -e "/usr/share/qemu/$f" ] || die "/usr/share/qemu/$f is missing; is qemu-system-x86 installed?"
            cp -L "/usr/share/qemu/$f" "$root/usr/share/qemu/$f"
        done
        pack "$root" >"$tmp/out/qemu.cpio"
        rm -rf "$root"
        mv -T "$tmp/out" "$out"
        rm -rf "$tmp"
        trap - EXIT
    fi
    exec 8>&-
    qemu_dir=$out
}

# Prints the shared libraries (and the loader) a dynamic executable needs.
libraries() {
    ldd "$1" 2>/dev/null | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' || true
}

# --- a run --------------------------------------------------------------------

# Copies HOST to RIG under the staging root, with the libraries of every
# dynamic executable in it.
stage_add() {
    local root=$1 spec=$2 host rig f lib
    host=${spec%%:*}
    rig=${spec#*:}
    [ "$spec" != "$host" ] || rig=$(realpath -s -- "$host")
    [ -e "$host" ] || die "--add $spec: $host does not exist."
    case "$rig" in
    /*) ;;
    *) die "--add $spec: the rig path must be absolute." ;;
    esac
    host=$(realpath -- "$host")
    mkdir -p "$root$(dirname "$rig")"
    cp -a -- "$host" "$root$rig"
    while IFS= read -r -d '' f; do
        [ "$(head -c4 "$f" | od -An -c | tr -d ' ')" = '177ELF' ] || continue
        while IFS= read -r lib; do
            [ -e "$root$lib" ] && continue
            mkdir -p "$root$(dirname "$lib")"
            cp -L "$lib" "$root$lib"
        done < <(libraries "$f")
    done < <(find "$host" -type f -perm -u+x -print0)
}

cmd_needed() {
    if [ ! -e /dev/kvm ]; then
        say "this host has no /dev/kvm: the rig is needed"
        return 0
    fi
    if ! grep -q -w -E 'vmx|svm' /proc/cpuinfo; then
        say "this host's CPU has no VMX/SVM (its /dev/kvm cannot boot Linux): the rig is needed"
        return 0
    fi
    say "this host has /dev/kvm with hardware virtualization: no rig needed"
    return 1
}

cmd_run() {
    local interactive=$1
    shift
    local adds=() modules=() with_qemu=false mem=2048 smp=2 timeout=
    while [ $# -gt 0 ]; do
        case "$1" in
        --add) [ $# -ge 2 ] || die "--add needs HOST[:RIG]."; adds+=("$2"); shift 2 ;;
        --qemu) with_qemu=true; shift ;;
        --module) [ $# -ge 2 ] || die "--module needs a NAME."; modules+=("$2"); shift 2 ;;
        --mem) [ $# -ge 2 ] || die "--mem needs MiB."; mem=$2; shift 2 ;;
        --smp) [ $# -ge 2 ] || die "--smp needs N."; smp=$2; shift 2 ;;
        --timeout) [ $# -ge 2 ] || die "--timeout needs SECONDS."; timeout=$2; shift 2 ;;
        -it | --interactive) interactive=true; shift ;;
        --) shift; break ;;
        *) die "unknown option '$1' (the command goes after --; try --help)." ;;
        esac
    done
    local n
    for n in "$mem" "$smp" ${timeout:+"$timeout"}; do
        [[ $n =~ ^[1-9][0-9]*$ ]] || die "'$n' is not a positive number."
    done
    local cmd="$*"
    if [ -z "$cmd" ]; then
        $interactive || die "run needs a command after --."
        cmd='sh'
    fi
    if [ -z "$timeout" ] && ! $interactive; then
        timeout=${EMBER_RIG_TIMEOUT:-1200}
    fi

    "$scripts_dir/deps.sh" >&2 || die "the Debian packages the rig needs are missing (see above)."
    build_rig
    $with_qemu && build_qemu_payload

    local tmp
    tmp=$(mktemp -d "${TMPDIR:-/tmp}/ember-rig.XXXXXX")
    # shellcheck disable=SC2064 # expand now: tmp is local
    trap "rm -rf '$tmp'" EXIT
    local root=$tmp/root spec kver m
    mkdir -p "$root/rig"
    for spec in "${adds[@]}"; do stage_add "$root" "$spec"; done
    kver=$(cat "$rig_dir/kernel-release")
    cp "$rig_dir/modules.list" "$root/rig/modules"
    if [ "${#modules[@]}" -gt 0 ]; then
        resolve_modules "$rig_dir/modules" "${modules[@]}" >"$tmp/modules"
        while IFS= read -r m; do
            grep -qxF "/lib/modules/$kver/$m" "$root/rig/modules" && continue
            mkdir -p "$root/lib/modules/$kver/$(dirname "$m")"
            cp "$rig_dir/modules/$m" "$root/lib/modules/$kver/$m"
            printf '/lib/modules/%s/%s\n' "$kver" "$m" >>"$root/rig/modules"
        done <"$tmp/modules"
    fi
    printf '%s\n' "$cmd" >"$root/rig/cmd"
    printf '%s\n' "$PWD" >"$root/rig/cwd"
    if $interactive; then
        echo interactive >"$root/rig/mode"
        stty size 2>/dev/null >"$root/rig/ttysize" || true
    else
        echo batch >"$root/rig/mode"
    fi
    {
        cat "$rig_dir/base.cpio"
        ! $with_qemu || cat "$qemu_dir/qemu.cpio"
        pack "$root"
    } >"$tmp/initrd.cpio"
    rm -rf "$root"

    # The rig's kernel ticks periodically (nohz=off highres=off): its local APIC timer then
    # re-arms itself in QEMU, where in one-shot mode the kernel re-arms it at each interrupt,
    # and an interrupt lost under many guests left no timer armed and the rig wedged. With the
    # periodic tick the clones' twenty guests also start three to four times faster.
    local qemu=(qemu-system-x86_64 -nodefaults -no-user-config -accel tcg -cpu EPYC
        -smp "$smp" -m "$mem" -display none -kernel "$rig_dir/vmlinuz" -initrd "$tmp/initrd.cpio"
        -append "console=ttyS0 panic=-1 quiet loglevel=4 nohz=off highres=off" -no-reboot)
    local limit=()
    [ -z "$timeout" ] || limit=(timeout --foreground -k 10 "$timeout")
    local log=$tmp/console.log rc=0 started=$SECONDS
    say "booting the rig ($smp vCPUs, $mem MiB$(! $with_qemu || echo ', with QEMU'))"
    if $interactive; then
        "${limit[@]}" "${qemu[@]}" -serial mon:stdio 2> >(filter_qemu_stderr >&2) | tee "$log" || rc=${PIPESTATUS[0]}
    else
        "${limit[@]}" "${qemu[@]}" -serial stdio 2> >(filter_qemu_stderr >&2) </dev/null | tee "$log" || rc=${PIPESTATUS[0]}
    fi
    local elapsed=$((SECONDS - started)) status up
    status=$(tr -d '\r' <"$log" | grep -a -o '^EMBER-RIG-EXIT [0-9]*$' | tail -1 | cut -d' ' -f2 || true)
    up=$(tr -d '\r' <"$log" | grep -a -o '^EMBER-RIG-UP uptime=[0-9.]*$' | tail -1 | cut -d= -f2 || true)
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        say "the rig did not finish within $timeout s and was stopped"
        exit 124
    fi
    if [ -z "$status" ]; then
        say "the rig stopped (QEMU status $rc) without reporting the command's exit status; see its console above"
        exit 125
    fi
    say "command exited with status $status; rig up at ${up:-?} s (guest clock), $elapsed s in all"
    exit "$status"
}

# QEMU's TCG warns about every EPYC feature it does not emulate; nothing else
# it says is dropped.
filter_qemu_stderr() {
    grep --line-buffered -v "TCG doesn't support requested feature" || true
}

case "${1:-}" in
run) shift; cmd_run false "$@" ;;
shell) shift; cmd_run true "$@" ;;
build)
    shift
    "$scripts_dir/deps.sh" >&2 || die "the Debian packages the rig needs are missing (see above)."
    build_rig
    if [ "${1:-}" = --qemu ]; then build_qemu_payload; fi
    printf '%s\n' "$rig_dir"
    ;;
needed) cmd_needed ;;
-h | --help | help) usage ;;
"") usage >&2; exit 2 ;;
*) die "unknown command '$1' (run, shell, build, needed; try --help)." ;;
esac
