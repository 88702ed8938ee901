#!/usr/bin/env bash
# VMDLS studies on MNIST (experiment=vmdls_mnist), then tables and plots:
#   Table 4 (loss ablation, d = 2 so that mu is plotted directly): L_t; L_t + L_d;
#           L_KL + L_t; L_KL + L_t + L_d with M_d = 1 and M_d = 32; one latent scatter per variant.
#   Table 5 (feature ensemble): macro-F1 of mu alone, then adding g, t3, t2, t1 (one run,
#           method.ensemble_ablation=true), and Fig. 3 (score histograms without / with w).
# Extra arguments go to every run, e.g. a GPU:
#   bash sweeps/vmdls_ablations.sh trainer=gpu trainer.max_epochs=50 method.samples_per_class=40
set -euo pipefail
cd "$(dirname "$0")/.."
out=${VMDLS_OUT:-outputs/vmdls_ablations}
python=${PYTHON:-python}

losses() {
  local name=$1; shift
  "$python" train.py experiment=vmdls_mnist method.latent_dim=2 detectors=none \
    hydra.run.dir="$out/losses/$name" "$@"
}
losses t          method.kl_weight=0 method.distance_weight=0 "$@"
losses t_d        method.kl_weight=0 "$@"
losses kl_t       method.distance_weight=0 "$@"
losses kl_t_d1    method.distance_margin=1 "$@"
losses kl_t_d32   method.distance_margin=32 "$@"
"$python" sweeps/vmdls_studies.py latent "$out"/losses/{t,t_d,kl_t,kl_t_d1,kl_t_d32} --out "$out/latent.png"
"$python" sweeps/vmdls_studies.py table "$out"/losses/{t,t_d,kl_t,kl_t_d1,kl_t_d32} | tee "$out/losses.md"

"$python" train.py experiment=vmdls_mnist method.ensemble_ablation=true hydra.run.dir="$out/features" "$@"
"$python" sweeps/vmdls_studies.py table "$out/features" | tee "$out/features.md"
"$python" sweeps/vmdls_studies.py histograms "$out/features" --out "$out/histograms.png"
