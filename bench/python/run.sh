#!/usr/bin/env bash
# Same-run baseline: measures PGCacheWatch 0.4.2 (Python) on this machine.
# Usage: bash bench/python/run.sh [baseline.py options]   (DATABASE_URL honoured)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bash "$here/setup.sh"
exec "$here/.venv/bin/python" "$here/baseline.py" "$@"
