#!/usr/bin/env bash
# Regenerates the README's charts: runs three benchmark programs with modest
# settings (a few minutes on 2 cores) and writes each one's same-run table as
# Markdown and its chart as SVG into docs/figures/ (or the directory given).
#
#   bash bench/figures.sh [DIR]
#
# hit-path: Cache::get next to quick_cache and moka (bench --quick)
# latency:  write issued → fresh read, pgcachewatch next to raw LISTEN + SELECT
# writers:  pgbench tps with and without watching (needs pgbench, pg_recvlogical)
#
# DATABASE_URL is honoured (default postgres://postgres@127.0.0.1:5432/test);
# PostgreSQL is started if it is down. CARGO_TARGET_DIR is honoured.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
dir="${1:-docs/figures}"
export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}"

bash .ci/ensure-postgres
cargo build --release -p pgcachewatch-bench --bin bench --bin latency --bin writers
run() { cargo run --quiet --release -p pgcachewatch-bench --bin "$@"; }

echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
run bench -- --quick --figures "$dir"
run latency -- --updates 1000 --figures "$dir"
run writers -- --seconds 5 --clients 16,8,2 --figures "$dir"
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "wrote $dir/{hit-path,latency,writers}.{md,svg}"
