#!/usr/bin/env bash
# Instructions per operation of the two hot paths, each next to its baseline,
# counted by callgrind (valgrind): unlike times, counts do not move with the
# machine's load. See bench/src/bin/instructions.rs for what each mode runs.
#
#   bash bench/instructions.sh
#
# Needs valgrind (Debian: apt-get install valgrind). CARGO_TARGET_DIR is honoured.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
command -v valgrind >/dev/null || {
  echo "bench/instructions.sh needs valgrind (Debian: apt-get install valgrind)" >&2
  exit 2
}
cargo build --quiet --release -p pgcachewatch-bench --bin instructions
bin="${CARGO_TARGET_DIR:-target}/release/instructions"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# Instructions per operation of mode $1 over $2 operations (only inside measure_*).
per_op() {
  valgrind --tool=callgrind --toggle-collect='instructions::measure_*' \
    --callgrind-out-file="$work/$1.out" "$bin" "$1" "$2" >/dev/null 2>"$work/$1.err" || {
    cat "$work/$1.err" >&2
    exit 1
  }
  total="$(callgrind_annotate "$work/$1.out" | awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1 }')"
  echo $((total / $2))
}

hit="$(per_op hit 1000000)"
quick="$(per_op quick-hit 1000000)"
echo "hit path, instructions per hit: Cache::get $hit, quick_cache::get $quick (baseline): $(awk "BEGIN { printf \"%.2f\", $hit / $quick }") x"
event="$(per_op burst-event 100000)"
alloc="$(per_op burst-event-alloc 100000)"
echo "burst event (parse, emit, dispatch, Greedy, cache), instructions per event: reusing events $event, allocating each $alloc (baseline): $(awk "BEGIN { printf \"%.2f\", $event / $alloc }") x"
