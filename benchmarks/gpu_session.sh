#!/usr/bin/env bash
# One GPU session (<= 10 min on one H100/H200), from a bare machine; the steps are in gpu_session.py.
#
#   bash benchmarks/gpu_session.sh prepare              # on the development machine, once
#   then the device tool: run(command="bash benchmarks/gpu_session.sh run --out $OUT",
#                             carry=[".device"], timeout_s=600)
#   bash benchmarks/gpu_session.sh run --dry-run --out /tmp/g   # a CPU check: the plan and the report
#
# prepare copies what the bare machine lacks into .device/ (git-ignored; the device tool carries it):
# the wheels of ../shared/device-wheels (hydra, omegaconf, nflows, ...) and the CIFAR-10 JPEG packs
# (the lossless training pack alone is over the tool's 64 MiB). run installs the wheels into
# /tmp/site, points the data root at .device/data and runs gpu_session.py.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED="${SHARED:-../shared}"
DEVICE_DIR="${DEVICE_DIR:-.device}"   # where prepare copies to (the folder the device tool carries)
DATA_FILES=(cifar10-train.npz cifar10-test.npz)

usage() { echo "usage: $0 prepare | run [--out DIR] [--budget-s S] [--steps a,b] [--dry-run]" >&2; exit 2; }
[ $# -ge 1 ] || usage
action="$1"; shift
case "$action" in
  prepare)
    [ $# -eq 0 ] || usage
    [ -d "$SHARED/device-wheels" ] || { echo "error: $SHARED/device-wheels not found (set SHARED=...)" >&2; exit 1; }
    mkdir -p "$DEVICE_DIR/wheels" "$DEVICE_DIR/data"
    cp "$SHARED"/device-wheels/*.whl "$DEVICE_DIR/wheels/"
    for f in "${DATA_FILES[@]}"; do
      [ -f "$SHARED/data/$f" ] || { echo "error: $SHARED/data/$f not found" >&2; exit 1; }
      cp "$SHARED/data/$f" "$DEVICE_DIR/data/"
    done
    du -sh "$DEVICE_DIR"
    echo "prepared .device/; now: run(command=\"bash benchmarks/gpu_session.sh run --out \$OUT\", carry=[\".device\"], timeout_s=600)"
    ;;
  run)
    dry=0
    for a in "$@"; do [ "$a" = "--dry-run" ] && dry=1; done
    if [ "$dry" = 0 ]; then
      [ -d .device/wheels ] || { echo "error: .device/wheels missing: run '$0 prepare' first and carry .device" >&2; exit 1; }
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .device/wheels/*.whl
      export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
      export OOD_LIGHTNING_DATA="$PWD/.device/data"
    fi
    export PYTHONUNBUFFERED=1
    exec "${PYTHON:-python3}" benchmarks/gpu_session.py run "$@"
    ;;
  *) usage ;;
esac
