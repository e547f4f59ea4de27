#!/usr/bin/env bash
# Creates bench/python/.venv with PGCacheWatch 0.4.2 and its pinned dependencies.
# Idempotent: does nothing when the venv already matches requirements.txt.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/.venv"
req="$here/requirements.txt"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi

stamp="$venv/.requirements.installed"
if [ -f "$stamp" ] && cmp -s "$stamp" "$req" \
    && "$venv/bin/python" -c "import pgcachewatch, asyncpg" 2>/dev/null; then
    exit 0
fi

"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -r "$req"
"$venv/bin/python" -m pip check
cp "$req" "$stamp"
