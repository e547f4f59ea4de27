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
# DATABASE_URL names a server of yours (used as it is: it needs wal_level =
# logical for the writers chart); without it the figures are measured on a
# throw-away cluster started for the run and removed at the end, as the test
# command does (.ci/servers). CARGO_TARGET_DIR is honoured.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
dir="${1:-docs/figures}"
# shellcheck source=.ci/servers
. .ci/servers
trap pgcw_cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
if [ -z "${DATABASE_URL:-}" ]; then
  pgcw_pg_binaries
  pgcw_own_postgres
fi
cargo build --release -p pgcachewatch-bench --bin bench --bin latency --bin writers
run() { cargo run --quiet --release -p pgcachewatch-bench --bin "$@"; }

echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
run bench -- --quick --figures "$dir"
run latency -- --updates 1000 --figures "$dir"
run writers -- --seconds 5 --clients 16,8,2 --figures "$dir"
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "wrote $dir/{hit-path,latency,writers}.{md,svg}"
