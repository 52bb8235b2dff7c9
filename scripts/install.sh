#!/usr/bin/env bash
# Set up drift-monitor from nothing in ./.venv.
#   bash scripts/install.sh          the library and its CLI
#   bash scripts/install.sh --test   plus the test dependencies, and the Debian packages
#                                    `prometheus` (prometheus, promtool) and
#                                    `prometheus-pushgateway` when those binaries are missing
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

# --- test binaries: tests/test_prometheus.py starts a real Prometheus server, a real
# Pushgateway and promtool (it fails, never skips, when they are missing).
if [ -n "$EXTRAS" ]; then
  if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1 \
      || ! command -v prometheus-pushgateway >/dev/null 2>&1; then
    if ! command -v apt-get >/dev/null 2>&1; then
      echo "error: the tests need promtool, prometheus and prometheus-pushgateway on PATH, and apt-get" >&2
      echo "       is not available to install them: install Prometheus (prometheus + promtool) and the" >&2
      echo "       Pushgateway (binary named prometheus-pushgateway) by hand, then re-run." >&2
      exit 1
    fi
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    echo "installing Debian packages: prometheus prometheus-pushgateway"
    # (On a host running systemd the packages also enable services on :9090 and :9091; the
    # tests use their own ephemeral ports and do not need them.)
    $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -qq --no-install-recommends prometheus prometheus-pushgateway \
      || { echo "error: apt-get could not install prometheus prometheus-pushgateway (see above)" >&2; exit 1; }
    for bin in promtool prometheus prometheus-pushgateway; do
      if ! command -v "$bin" >/dev/null 2>&1; then
        echo "error: $bin is still not on PATH after installing the Debian packages" >&2
        exit 1
      fi
    done
  fi
fi

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install --quiet --disable-pip-version-check "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".${EXTRAS}"
.venv/bin/python -c "import drift_monitor, torch; print('drift-monitor', drift_monitor.__version__, '| torch', torch.__version__)"
