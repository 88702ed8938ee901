#!/usr/bin/env bash
# Ten seeds of the full DHM recipe (experiment=dhm_cifar10) -> paper Table 1: AUROC, AUPR-in and
# AuTC per OOD set, mean ± std over seeds, the DHM score beside the softmax baseline (MSP) of
# the same runs (compare.md), plus every detector in summary.md.
#
#   sweeps/dhm_seeds.sh                         # seeds 0..9, GPU
#   sweeps/dhm_seeds.sh cpu                     # experiment=dhm_tiny, 3 seeds, minutes on a CPU
#   SEEDS=0,1,2 sweeps/dhm_seeds.sh gpu "ood=[odin,mnist,noise,cifar]"
set -euo pipefail
cd "$(dirname "$0")/.."
SCALE=${1:-gpu}
[ $# -gt 0 ] && shift
PY=${PYTHON:-python}
case "$SCALE" in
  gpu) EXP=experiment=dhm_cifar10; SEEDS=${SEEDS:-0,1,2,3,4,5,6,7,8,9} ;;
  cpu) EXP=experiment=dhm_tiny; SEEDS=${SEEDS:-0,1,2} ;;
  *) echo "usage: $0 [gpu|cpu] [hydra overrides...]" >&2; exit 2 ;;
esac
OUT=${OUT:-outputs/sweeps/dhm_seeds_${SCALE}/$(date +%Y-%m-%d_%H-%M-%S)}
"$PY" train.py -m "$EXP" "seed=$SEEDS" "tags=[dhm_seeds]" "hydra.sweep.dir=$OUT" "$@"
"$PY" evaluate.py "run_dir=$OUT" "compare=[dhm,msp]"
