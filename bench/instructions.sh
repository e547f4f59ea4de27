#!/usr/bin/env bash
# Instructions per operation of the hot paths, each next to its baseline,
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
keyed="$(per_op keyed-table-event 1000000)"
owned="$(per_op keyed-table-event-owned 1000000)"
echo "Keyed on a keyless event of a mapped table, instructions per event: $keyed; building its table list with owned String names as before (baseline): $owned"
ratio() { awk "BEGIN { printf \"%.2f\", $1 / $2 }"; }
replication="$(per_op replication-event 100000)"
frames="$(per_op replication-frames 100000)"
echo "replication source, pgoutput decode + assembly (one-row UPDATE transactions), instructions per event: $replication; framing the same bytes only (baseline): $frames: $(ratio "$replication" "$frames") x"
nats="$(per_op nats-event 100000)"
bytes="$(per_op nats-bytes 100000)"
value="$(per_op nats-value 100000)"
echo "NATS source, relay message parsed into an event (WireMessage::from_json), instructions per event: $nats; every payload byte read, as a raw consumer (baseline): $bytes: $(ratio "$nats" "$bytes") x; parsed as a serde_json::Value: $value: $(ratio "$nats" "$value") x"
for mode in hit burst-event keyed-table-event keyed-table-event-owned replication-event replication-frames nats-event nats-bytes nats-value; do
  echo "heap allocations per operation, $mode: $("$bin" "$mode" 100000 | awk '{print $NF}')"
done
