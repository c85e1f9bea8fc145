#!/usr/bin/env bash
# Installs the Debian 12 packages that the guest build (guest.sh), the nested
# rig (rig.sh) and the end-to-end tests need. Idempotent: when everything is
# present it only asks dpkg and returns. Runs `apt-get update` only when the
# package lists are missing or an install from them fails.
#
# usage: deps.sh [--check]
#   --check   list missing packages on stderr and exit 1 if any; install nothing
set -euo pipefail

packages=(
    # guest.sh: kernel build from the Debian source package
    linux-source-6.1 build-essential flex bison bc libelf-dev libssl-dev xz-utils
    # guest.sh: userland, initramfs and ext4 image
    busybox-static cpio e2fsprogs
    # rig.sh: the outer machine, and QEMU microvm as a reference VMM inside it
    qemu-system-x86
    # tests: TAP devices and addresses on hosts with hardware virtualization
    iproute2
    # tests: the API driven as Firecracker's guide does, with curl --unix-socket
    curl
)

die() {
    printf 'deps.sh: error: %s\n' "$*" >&2
    exit 1
}

check_only=false
case "${1:-}" in
"") ;;
--check) check_only=true ;;
-h | --help)
    sed -n '2,9s/^# \{0,1\}//p' "$0"
    exit 0
    ;;
*) die "unknown argument '$1' (try --help)." ;;
esac

missing() {
    local pkg status
    for pkg in "${packages[@]}"; do
        status=$(dpkg-query -W -f='${db:Status-Abbrev}' "$pkg" 2>/dev/null || true)
        [ "${status:0:2}" = "ii" ] || printf '%s\n' "$pkg"
    done
}

mapfile -t todo < <(missing)
[ "${#todo[@]}" -eq 0 ] && exit 0

if $check_only; then
    printf 'deps.sh: missing Debian packages: %s\n' "${todo[*]}" >&2
    exit 1
fi
[ "$(id -u)" -eq 0 ] ||
    die "missing Debian packages: ${todo[*]}. Run $0 as root to install them."

export DEBIAN_FRONTEND=noninteractive
install() {
    apt-get install -y -q --no-install-recommends "${todo[@]}"
}

printf 'deps.sh: installing %s\n' "${todo[*]}" >&2
if compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null && install; then
    exit 0
fi
printf 'deps.sh: refreshing the package lists\n' >&2
apt-get update -q || die "apt-get update failed; check the network and /etc/apt/sources.list."
install || die "apt-get install of ${todo[*]} failed."
