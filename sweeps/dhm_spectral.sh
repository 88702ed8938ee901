#!/usr/bin/env bash
# DHM spectral-coefficient sweep c = 1 ... 6 at the recipe's λ (paper Fig. 4), then the figure:
# test accuracy, AUROC and AUPR-in per OOD set against c, mean ± std over seeds.
#
#   sweeps/dhm_spectral.sh          # experiment=dhm_cifar10 (GPU)
#   sweeps/dhm_spectral.sh cpu      # experiment=dhm_tiny, minutes on a CPU
#   COEFFS=1,3,6 SEEDS=0 sweeps/dhm_spectral.sh gpu trainer.max_epochs=60
#
# Output: $OUT (default outputs/sweeps/dhm_spectral_<scale>/<date>): runs, summary.md/.csv,
# sweep_spectral_coeff.png/.csv, compare.md (DHM vs MSP per c).
set -euo pipefail
cd "$(dirname "$0")/.."
SCALE=${1:-gpu}
[ $# -gt 0 ] && shift
PY=${PYTHON:-python}
COEFFS=${COEFFS:-1,2,3,4,5,6}
case "$SCALE" in
  gpu) EXP=experiment=dhm_cifar10; SEEDS=${SEEDS:-0,1,2} ;;
  cpu) EXP=experiment=dhm_tiny; SEEDS=${SEEDS:-0,1} ;;
  *) echo "usage: $0 [gpu|cpu] [hydra overrides...]" >&2; exit 2 ;;
esac
OUT=${OUT:-outputs/sweeps/dhm_spectral_${SCALE}/$(date +%Y-%m-%d_%H-%M-%S)}
"$PY" train.py -m "$EXP" "method.spectral_coeff=$COEFFS" "seed=$SEEDS" "tags=[dhm_spectral_sweep]" \
  "hydra.sweep.dir=$OUT" "$@"
"$PY" evaluate.py "run_dir=$OUT" plot=spectral_coeff "compare=[dhm,msp]"
