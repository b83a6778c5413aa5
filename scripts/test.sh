#!/usr/bin/env bash
# Install everything the test suite needs (Python deps into .venv; sipp and ffmpeg from Debian
# for the interop tests, chromium for the console, prometheus for promtool), run ruff and mypy, then the whole suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

need_apt=()
command -v sipp >/dev/null 2>&1 || need_apt+=(sip-tester)
command -v ffprobe >/dev/null 2>&1 || need_apt+=(ffmpeg)
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)     # web console tests (Playwright drives it)
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)   # alert rules checked with promtool
if [ ${#need_apt[@]} -gt 0 ]; then
  SUDO=""
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "test.sh: need root or sudo to apt-get install ${need_apt[*]}" >&2; exit 1; }
    SUDO=sudo
  fi
  echo "test.sh: installing ${need_apt[*]} (Debian packages)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
# Screenshots of the browser tests are kept here (git ignores it).
export GB28181_ARTIFACTS=${GB28181_ARTIFACTS:-$PWD/test-artifacts}
# Lint and types first: a finding fails the run (set -e) before the long suite starts.
echo "test.sh: ruff"
.venv/bin/ruff check src simulators tests bench
echo "test.sh: mypy"
.venv/bin/mypy
# Most tests wait on sockets and timers, not the CPU: three workers (a file's tests stay together,
# in order, with their module fixtures) take a third of the time even on two cores.
# PYTEST_WORKERS=0 runs them in this process.
exec .venv/bin/python -m pytest -q -p no:cacheprovider -n "${PYTEST_WORKERS:-3}" --dist loadfile "$@"
