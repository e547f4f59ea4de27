#!/usr/bin/env bash
# Makes a venv at $1 with nats-py as pinned in requirements-nats.txt, for the
# Python consumer in docs/wire/consumer.py. Idempotent: does nothing when the
# venv already matches. Fails (non-zero) without python3 or when pip cannot
# install it.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${1:?usage: setup_nats.sh VENV_DIR}"
req="$here/requirements-nats.txt"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
stamp="$venv/.requirements.installed"
if [ -f "$stamp" ] && cmp -s "$stamp" "$req" && "$venv/bin/python" -c "import nats" 2>/dev/null; then
    exit 0
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -r "$req"
cp "$req" "$stamp"
