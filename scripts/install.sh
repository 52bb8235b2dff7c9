#!/usr/bin/env bash
# Set up drift-monitor from nothing in ./.venv.
#   bash scripts/install.sh          the library and its CLI
#   bash scripts/install.sh --test   plus the test dependencies
# torch is installed first and then pinned (constraints.txt) so that no later dependency can
# replace it; set TORCH_SPEC (e.g. "torch==2.13.0+cu128") to choose another build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
EXTRAS=""
for arg in "$@"; do
  case "$arg" in
    --test) EXTRAS="[test]" ;;
    *) echo "unknown option: $arg" >&2; exit 2 ;;
  esac
done
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install --quiet --disable-pip-version-check "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".${EXTRAS}"
.venv/bin/python -c "import drift_monitor, torch; print('drift-monitor', drift_monitor.__version__, '| torch', torch.__version__)"
