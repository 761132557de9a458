#!/usr/bin/env bash
# Thin wrapper: launch/tpu_vm.sh COMMAND [flags] [-- overrides] == python3 launch/tpu_vm.py ...
# (create | setup | run | logs | stop | fetch | delete | all; --dry-run prints the commands).
exec "${PYTHON:-python3}" "$(dirname "$0")/tpu_vm.py" "$@"
