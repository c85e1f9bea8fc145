#!/usr/bin/env bash
# Line coverage of the library crates, as a ratchet in rust-vmm's format.
#
# Reads coverage_config.json at the workspace root:
#   coverage_score  the total line coverage, in percent, that the crates must keep
#   exclude_path    comma-separated path prefixes: workspace members under them are not
#                   measured, and files under them are not counted
#   crate_features  features to build with (cargo's --features syntax); empty for none
#
# Measures with cargo-tarpaulin (installed with `cargo install --locked` at a pinned
# version when missing) and its LLVM engine, which reads the profiles itself and so
# needs no llvm-tools component. The unit and integration tests of each crate run as
# `cargo test` runs them (not the doctests), so the vCPU tests need /dev/kvm and the
# TAP tests root, as in the test suite. Prints the coverage of each crate and the
# total, and fails when the total is more than 0.5 below coverage_score. Builds into
# $CARGO_TARGET_DIR, or target/coverage by default, apart from the ordinary builds.
#
# usage: coverage.sh [--update]
#   --update  write the measured total into coverage_config.json as the new score
set -euo pipefail

tarpaulin_version=0.37.5
# How far below coverage_score the total may fall, in percentage points.
tolerance=0.5

scripts=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$scripts/../../.." && pwd)
config=$root/coverage_config.json
cd "$root"

say() { printf 'coverage.sh: %s\n' "$*" >&2; }
die() {
    say "error: $*"
    exit 1
}

update=false
case "${1:-}" in
"") ;;
--update) update=true ;;
-h | --help)
    sed -n '2,19s/^# \{0,1\}//p' "$0"
    exit 0
    ;;
*) die "unknown argument '$1' (try --help)." ;;
esac

[ -f "$config" ] || die "$config is missing."

# The value of "key" in coverage_config.json, a flat JSON object with one key a line as
# rust-vmm writes it: a string's contents, or a number.
config_value() {
    sed -n -e "s/^[[:space:]]*\"$1\"[[:space:]]*:[[:space:]]*\"\([^\"]*\)\".*/\1/p" \
        -e "t" -e "s/^[[:space:]]*\"$1\"[[:space:]]*:[[:space:]]*\([0-9.]*\).*/\1/p" "$config"
}
score=$(config_value coverage_score)
exclude_path=$(config_value exclude_path)
features=$(config_value crate_features)
[[ "$score" =~ ^[0-9]+(\.[0-9]+)?$ ]] ||
    die "coverage_score in $config is not a number: '$score' (one key a line, as rust-vmm writes it)."

# Tarpaulin, pinned. Without the default features it has no Coveralls client, and so
# no git2 and OpenSSL to build.
installed=$(cargo tarpaulin --version 2>/dev/null | grep -oE '[0-9]+\.[0-9]+\.[0-9]+$' || true)
if [ "$installed" != "$tarpaulin_version" ]; then
    say "installing cargo-tarpaulin $tarpaulin_version${installed:+ (found $installed)}"
    cargo install --locked --no-default-features cargo-tarpaulin --version "$tarpaulin_version" ||
        die "cargo install cargo-tarpaulin $tarpaulin_version failed."
fi

# The workspace members that are not under an excluded path, and glob patterns for the
# files that are not counted.
IFS=, read -r -a excluded <<<"$exclude_path"
excluded_files=()
for prefix in "${excluded[@]}"; do
    prefix=${prefix#"${prefix%%[![:space:]]*}"}
    prefix=${prefix%"${prefix##*[![:space:]]}"}
    if [ -n "$prefix" ]; then
        excluded_files+=("${prefix%/}/*")
    fi
done
packages=()
crate_dirs=()
while read -r manifest; do
    dir=${manifest%/Cargo.toml}
    dir=${dir#"$root"/}
    skip=false
    for pattern in "${excluded_files[@]}"; do
        # shellcheck disable=SC2053 # the pattern is a glob on purpose
        if [[ "$dir/" == $pattern ]]; then
            skip=true
        fi
    done
    $skip && continue
    name=$(awk -F'"' '/^\[/ { in_package = ($0 == "[package]") } in_package && /^name *=/ { print $2; exit }' "$manifest")
    [ -n "$name" ] || die "no package name in $manifest."
    packages+=("$name")
    crate_dirs+=("$dir")
done < <(cargo metadata --no-deps --format-version 1 --locked |
    grep -oE '"manifest_path":"[^"]*"' | cut -d'"' -f4 | sort)
[ "${#packages[@]}" -gt 0 ] || die "every workspace member is under exclude_path ('$exclude_path')."

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target/coverage}
report=$CARGO_TARGET_DIR/tarpaulin-report
rm -rf "$report"
mkdir -p "$report"

args=(--engine llvm --skip-clean --locked --color never --timeout 300
    --out Lcov --output-dir "$report")
for package in "${packages[@]}"; do
    args+=(--packages "$package")
done
if [ "${#excluded_files[@]}" -gt 0 ]; then
    args+=(--exclude-files "${excluded_files[@]}")
fi
if [ -n "$features" ]; then
    args+=(--features "$features")
fi

say "measuring the line coverage of ${packages[*]}"
say "cargo tarpaulin ${args[*]}"
start=$SECONDS
cargo tarpaulin "${args[@]}" >"$report/tarpaulin.log" 2>&1 || {
    tail -n 40 "$report/tarpaulin.log" >&2
    die "cargo tarpaulin failed (a test failed or could not run); its output is in $report/tarpaulin.log."
}
tests=$(awk '/^test result: ok\./ { binaries++; passed += $4 } END { printf "%d tests passed in %d test binaries", passed, binaries }' "$report/tarpaulin.log")
say "$tests, measured in $((SECONDS - start)) s; report in $report/lcov.info"

# Lines hit and found per crate directory, from the LCOV report, then the total.
per_crate=$(awk -v root="$root/" -v dirs="${crate_dirs[*]}" -v names="${packages[*]}" '
    BEGIN { n = split(dirs, dir, " "); split(names, name, " ") }
    /^SF:/ { file = substr($0, 4); crate = 0
             if (index(file, root) == 1) file = substr(file, length(root) + 1)
             for (i = 1; i <= n; i++) if (index(file, dir[i] "/") == 1) crate = i }
    /^LF:/ && crate { found[crate] += substr($0, 4) }
    /^LH:/ && crate { hit[crate] += substr($0, 4) }
    END {
        for (i = 1; i <= n; i++) {
            if (found[i] == 0) continue
            printf "%-22s %6.2f%%  %5d/%-5d lines\n", name[i], 100 * hit[i] / found[i], hit[i], found[i]
            total_hit += hit[i]; total_found += found[i]
        }
        if (total_found == 0) exit 1
        printf "%-22s %6.2f%%  %5d/%-5d lines\n", "total", 100 * total_hit / total_found, total_hit, total_found
    }' "$report/lcov.info") || die "the report $report/lcov.info counts no lines of the crates."
printf '%s\n' "$per_crate"
total=$(printf '%s\n' "$per_crate" | awk '$1 == "total" { sub("%", "", $2); print $2 }')

if $update; then
    sed -i "s/^\([[:space:]]*\"coverage_score\"[[:space:]]*:[[:space:]]*\)[0-9.]*/\1$total/" "$config"
    say "coverage_score in coverage_config.json is now $total (was $score)."
    exit 0
fi

verdict=$(awk -v total="$total" -v score="$score" -v tolerance="$tolerance" 'BEGIN {
    if (total < score - tolerance) print "drop"
    else if (total > score + tolerance) print "rise"
    else print "ok" }')
case "$verdict" in
drop)
    die "total line coverage $total% is more than $tolerance below coverage_score $score%. Add tests for what the change left untested (the uncovered lines are in $report/lcov.info)."
    ;;
rise)
    say "total line coverage $total% is above coverage_score $score%: run $0 --update and commit coverage_config.json to raise the ratchet."
    ;;
*) say "total line coverage $total% keeps coverage_score $score% (tolerance $tolerance)." ;;
esac
