#!/usr/bin/env bash
# Install gb28181 into .venv and start the server on its embedded defaults
# (SQLite under ./data, SIP 5060 UDP+TCP, HTTP 8080). Extra arguments go to `gb28181 serve`,
# e.g. scripts/run.sh --config configs/default.yaml
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[sim]'
exec .venv/bin/gb28181 serve "$@"
