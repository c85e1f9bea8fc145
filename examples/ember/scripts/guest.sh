#!/usr/bin/env bash
# Builds the ember test guest from Debian packages only:
#
#   vmlinux            ELF kernel with the PVH entry note (Linux 6.1, linux-source-6.1)
#   bzImage            the same kernel as a compressed boot image
#   initramfs.cpio.gz  busybox-static, with guest/init as /init
#   rootfs.ext4        64 MiB ext4 root filesystem: busybox, guest/init as /sbin/init
#   rootfs-part.img    the same file system as partition 1 of an MBR-partitioned
#                      disk (root=/dev/vda1)
#   config             the kernel .config that was built
#   inputs             what the cache key was computed from
#
# The kernel is tinyconfig plus guest/microvm.config. The artifacts land in
#   ${EMBER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ember}/guest-<hash>
# where <hash> covers this script, guest/microvm.config, guest/init and the
# versions of the Debian packages used; a second run with the same inputs only
# prints the directory. The kernel is cached on its own (kernel-<hash>, keyed by
# the config, the kernel recipe and the toolchain), so a change to guest/init
# repacks the userland in seconds. Progress goes to stderr; the artifact
# directory is the last (only) line on stdout:
#
#   dir=$(examples/ember/scripts/guest.sh | tail -1)
#
# usage: guest.sh [--print-hash]
#   --print-hash   print the cache key and exit without building
set -euo pipefail

scripts_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
guest_src=$(cd "$scripts_dir/../guest" && pwd)
self=$scripts_dir/$(basename "${BASH_SOURCE[0]}")
fragment=$guest_src/microvm.config
init=$guest_src/init
kernel_tarball=/usr/src/linux-source-6.1.tar.xz
busybox=/bin/busybox
rootfs_size=64M

say() { printf 'guest.sh: %s\n' "$*" >&2; }
die() {
    printf 'guest.sh: error: %s\n' "$*" >&2
    exit 1
}

print_hash=false
case "${1:-}" in
"") ;;
--print-hash) print_hash=true ;;
-h | --help)
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$self"
    exit 0
    ;;
*) die "unknown argument '$1' (try --help)." ;;
esac

checksum() { sha256sum | cut -c1-64; }
short() { sha256sum | cut -c1-16; }

# --- the kernel -----------------------------------------------------------------

# Runs a command in a session of its own with its output in a log, printing a
# progress line every 20 s and the log's tail if it fails.
bg_pid=
logged() {
    local what=$1 log=$2 pid rc=0 tick=0 last
    shift 2
    setsid "$@" >"$log" 2>&1 </dev/null &
    pid=$!
    bg_pid=$pid
    while kill -0 "$pid" 2>/dev/null; do
        sleep 1
        tick=$((tick + 1))
        if [ $((tick % 20)) -eq 0 ]; then
            last=$(grep -E '^ +[A-Z0-9_]+ +[^ ]' "$log" | tail -1 | sed 's/^ *//;s/  */ /g' || true)
            say "$what: $tick s${last:+ ($last)}"
        fi
    done
    wait "$pid" || rc=$?
    bg_pid=
    if [ "$rc" -ne 0 ]; then
        tail -n 40 "$log" >&2
        die "$what failed with status $rc; the full log was $log (removed on exit)."
    fi
}

# Builds vmlinux, bzImage, config and the host tool gen_init_cpio into $1,
# working in $2.
build_kernel() {
    local dest=$1 work=$2 src build jobs line sym
    say "unpacking $kernel_tarball"
    tar -xJf "$kernel_tarball" -C "$work"
    src=$(find "$work" -mindepth 1 -maxdepth 1 -type d -name 'linux-source-*' | head -1)
    [ -n "$src" ] || die "$kernel_tarball holds no linux-source-* directory."
    build=$work/build
    mkdir "$build"
    local kmake=(make -C "$src" O="$build" KBUILD_BUILD_USER=ember KBUILD_BUILD_HOST=ember
        KBUILD_BUILD_TIMESTAMP='2024-01-01 00:00:00 UTC')

    say "configuring: tinyconfig + $(basename "$fragment")"
    logged "configure" "$work/config.log" "${kmake[@]}" tinyconfig
    logged "configure" "$work/merge.log" \
        "$src/scripts/kconfig/merge_config.sh" -m -O "$build" "$build/.config" "$fragment"
    logged "configure" "$work/olddefconfig.log" "${kmake[@]}" olddefconfig

    # Every option the fragment sets must have survived dependency resolution.
    local dropped=()
    while IFS= read -r line; do
        case "$line" in
        CONFIG_*=*) grep -qxF "$line" "$build/.config" || dropped+=("$line") ;;
        "# CONFIG_"*" is not set")
            sym=${line#\# }
            sym=${sym%% *}
            if grep -q "^$sym=" "$build/.config"; then dropped+=("$line"); fi
            ;;
        esac
    done <"$fragment"
    if [ "${#dropped[@]}" -gt 0 ]; then
        printf '  %s\n' "${dropped[@]}" >&2
        die "these lines of $fragment did not survive 'make olddefconfig' (a dependency is missing)."
    fi

    jobs=$(nproc)
    say "compiling Linux $("${kmake[@]}" -s --no-print-directory kernelversion) with -j$jobs (about 4 minutes on 2 free cores)"
    logged "kernel build" "$work/build.log" "${kmake[@]}" -j"$jobs" bzImage
    cp "$build/vmlinux" "$dest/vmlinux"
    cp "$build/arch/x86/boot/bzImage" "$dest/bzImage"
    cp "$build/.config" "$dest/config"
    # The PVH entry point is an ELF note of owner "Xen", type 0x12 (XEN_ELFNOTE_PHYS32_ENTRY).
    readelf -n "$dest/vmlinux" | grep -E '^ +Xen ' | grep -q '0x00000012' ||
        die "vmlinux has no PVH entry note (Xen note 0x12); is CONFIG_PVH set?"
    gcc -O2 -o "$dest/gen_init_cpio" "$src/usr/gen_init_cpio.c"
}

# --- the userland ---------------------------------------------------------------

# Every busybox applet as a path relative to /, except init, which is guest/init.
applets() {
    "$busybox" --list-full | grep -v -x -E 'sbin/init|linuxrc|bin/busybox'
}
base_dirs=(bin sbin usr usr/bin usr/sbin dev proc sys tmp run root etc mnt)

build_initramfs() {
    local kernel=$1 dest=$2 work=$3 d a
    {
        for d in "${base_dirs[@]}"; do printf 'dir /%s 0755 0 0\n' "$d"; done
        printf 'nod /dev/console 0600 0 0 c 5 1\n'
        printf 'file /bin/busybox %s 0755 0 0\n' "$busybox"
        applets | while IFS= read -r a; do printf 'slink /%s /bin/busybox 0777 0 0\n' "$a"; done
        printf 'file /init %s 0755 0 0\n' "$init"
        printf 'file /sbin/init %s 0755 0 0\n' "$init"
    } >"$work/initramfs.list"
    "$kernel/gen_init_cpio" -t 0 "$work/initramfs.list" | gzip -9 -n >"$dest/initramfs.cpio.gz"
}

build_rootfs() {
    local dest=$1 work=$2 root=$2/rootfs d a
    for d in "${base_dirs[@]}"; do mkdir -p "$root/$d"; done
    chmod 0700 "$root/root"
    chmod 1777 "$root/tmp"
    cp "$busybox" "$root/bin/busybox"
    applets | while IFS= read -r a; do ln -s /bin/busybox "$root/$a"; done
    install -m 0755 "$init" "$root/sbin/init"
    mkfs.ext4 -q -F -L ember-root -E root_owner=0:0 -d "$root" "$dest/rootfs.ext4" "$rootfs_size" >&2 ||
        die "mkfs.ext4 could not build the rootfs image."
    build_partitioned "$dest/rootfs.ext4" "$dest/rootfs-part.img"
}

# Puts a file system image in partition 1 (type 0x83, from sector 2048) of an
# MBR-partitioned disk image.
build_partitioned() {
    local fs=$1 disk=$2 start=2048 sectors
    sectors=$(($(stat -c %s "$fs") / 512))
    # One partition entry: not bootable, CHS fields unused (0xfe 0xff 0xff), type
    # 0x83, first sector and sector count as little-endian 32-bit numbers.
    le32() { printf '\\%03o\\%03o\\%03o\\%03o' $(($1 & 255)) $(($1 >> 8 & 255)) $(($1 >> 16 & 255)) $(($1 >> 24 & 255)); }
    truncate -s $(((start + sectors) * 512)) "$disk"
    dd if="$fs" of="$disk" bs=512 seek="$start" conv=notrunc status=none
    printf "\\000\\376\\377\\377\\203\\376\\377\\377$(le32 "$start")$(le32 "$sectors")" |
        dd of="$disk" bs=1 seek=446 conv=notrunc status=none
    printf '\125\252' | dd of="$disk" bs=1 seek=510 conv=notrunc status=none
}

# --- cache keys -----------------------------------------------------------------

"$scripts_dir/deps.sh" >&2 || die "the Debian packages the build needs are missing (see above)."
[ -r "$kernel_tarball" ] || die "$kernel_tarball is missing; is linux-source-6.1 installed?"
if ldd "$busybox" >/dev/null 2>&1; then
    die "$busybox is dynamically linked; install busybox-static instead of busybox."
fi

kernel_inputs=$(
    printf 'recipe %s\n' "$(declare -f logged build_kernel | checksum)"
    printf 'microvm.config %s\n' "$(checksum <"$fragment")"
    dpkg-query -W -f='package ${Package} ${Version}\n' linux-source-6.1 gcc-12 binutils libc6-dev
)
kernel_hash=$(printf '%s\n' "$kernel_inputs" | short)
inputs_text=$(
    printf 'kernel %s\n' "$kernel_hash"
    printf 'script %s\n' "$(checksum <"$self")"
    printf 'init %s\n' "$(checksum <"$init")"
    dpkg-query -W -f='package ${Package} ${Version}\n' busybox-static e2fsprogs
)
hash=$(printf '%s\n' "$inputs_text" | short)
if $print_hash; then
    printf '%s\n' "$hash"
    exit 0
fi

cache_root=${EMBER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ember}
out=$cache_root/guest-$hash
kernel_out=$cache_root/kernel-$kernel_hash
if [ -d "$out" ]; then
    printf '%s\n' "$out"
    exit 0
fi

mkdir -p "$cache_root"
exec 9>"$cache_root/.guest.lock"
if ! flock -n 9; then
    say "waiting for another guest.sh building in $cache_root"
    flock 9
fi
if [ -d "$out" ]; then
    printf '%s\n' "$out"
    exit 0
fi

tmp=$(mktemp -d "$cache_root/.guest-$hash.XXXXXX")
cleanup() {
    # A build still running is in a session of its own; end all of it.
    [ -z "$bg_pid" ] || kill -- "-$bg_pid" 2>/dev/null || true
    rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
started=$SECONDS

if [ ! -d "$kernel_out" ]; then
    say "building kernel $kernel_hash in $tmp"
    mkdir "$tmp/kernel" "$tmp/kwork"
    build_kernel "$tmp/kernel" "$tmp/kwork"
    printf '%s\n' "$kernel_inputs" >"$tmp/kernel/inputs"
    rm -rf "$tmp/kwork"
    mv -T "$tmp/kernel" "$kernel_out"
fi

say "packing the userland for guest $hash"
stage=$tmp/out
mkdir "$stage" "$tmp/uwork"
for f in vmlinux bzImage config; do
    ln "$kernel_out/$f" "$stage/$f" 2>/dev/null || cp "$kernel_out/$f" "$stage/$f"
done
build_initramfs "$kernel_out" "$stage" "$tmp/uwork"
build_rootfs "$stage" "$tmp/uwork"
printf '%s\n' "$inputs_text" >"$stage/inputs"
mv -T "$stage" "$out"
say "done in $((SECONDS - started)) s: $out"
printf '%s\n' "$out"
