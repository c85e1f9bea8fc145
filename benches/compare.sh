#!/usr/bin/env bash
# The crates' criterion benches at another revision beside the working tree, in one run: for each
# bench target, the other revision runs first and saves a criterion baseline, then the working
# tree runs against it, so that the two measure one right after the other on the same machine.
# Criterion prints each benchmark's change with its confidence interval.
#
# usage: benches/compare.sh REV [BENCH...] [-- CRITERION_ARGS...]
#   REV             the revision to compare with (a commit, a tag, main, ...)
#   BENCH           bench targets of ember-benches (default: all of them)
#   CRITERION_ARGS  passed to both runs, e.g. --warm-up-time 1 --measurement-time 3
#
# The other revision is checked out in a git worktree under target/bench-compare, with a target
# directory of its own; the criterion data of both runs goes to target/bench-compare/criterion.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
rev=${1:?usage: benches/compare.sh REV [BENCH...] [-- CRITERION_ARGS...]}
shift
benches=()
while [ $# -gt 0 ] && [ "$1" != -- ]; do
    benches+=("$1")
    shift
done
[ "${1:-}" = -- ] && shift
if [ ${#benches[@]} -eq 0 ]; then
    mapfile -t benches < <(sed -n 's/^name = "\(.*\)"$/\1/p' benches/Cargo.toml | tail -n +2)
fi

work=$root/target/bench-compare
other=$work/tree
export CRITERION_HOME=$work/criterion
mkdir -p "$work"
if [ -d "$other" ]; then
    git -C "$other" checkout --quiet --detach "$rev"
else
    git worktree add --quiet --detach "$other" "$rev"
fi
echo "==> $rev is $(git -C "$other" log --oneline -1)"

echo "==> building the benches of both trees"
(cd "$other" && cargo bench --locked -p ember-benches --no-run)
cargo bench --locked -p ember-benches --no-run

for bench in "${benches[@]}"; do
    echo "==> $bench at $rev"
    (cd "$other" && cargo bench --locked -p ember-benches --bench "$bench" -- \
        --save-baseline before "$@")
    echo "==> $bench in the working tree, against $rev"
    cargo bench --locked -p ember-benches --bench "$bench" -- --baseline before "$@"
done
