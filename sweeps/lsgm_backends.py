"""LSGM's mixture fit on one layer of a frozen backbone: scikit-learn's Dirichlet-process
variational fit (the paper's suggestion, §4.3) against our torch EM (``backend=torch``), on the
paper's features (no standardisation, no PCA). Decides whether the faster EM may be the default.

    OMP_NUM_THREADS=1 python sweeps/lsgm_backends.py --out docs/results/lsgm_backends_cifar10_resnet20.md

Each fit is a one-layer LSGM (= that layer's mixture, scored by its log-density), fitted on the
whole plain ID training split, one torch / BLAS thread. Reported per backend: the mean
log-likelihood of the held-out ID test features (nats per input, the same raw feature space for
both), AUROC of ID test against one OOD set, components with weight > 1e-3, iterations and the
wall time of the fit. Features come from the framework's feature cache (filled on the first run;
``train.py`` reads the same entries). Writes the page (with the command, commit and machine) to
``--out`` and the numbers beside it as ``.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch
from _common import compose_train

from ood_lightning.core import provenance
from ood_lightning.core.errors import ConfigError, OODLightningError
from ood_lightning.detectors.lsgm import LSGM
from ood_lightning.evaluation.metrics import auroc

log = logging.getLogger("lsgm_backends")

#: the published ResNet-20 on lossless CIFAR-10, LSGM's fit data (the whole plain training split)
DEFAULT_OVERRIDES = ("data=cifar10", "backbone=cifar_resnet20_pretrained", "method=posthoc", "ood=odin",
                     "detectors=none", "evaluation.fit_limit=null", "evaluation.fit_augmented=false")
#: the two fits compared: the paper's variational Dirichlet-process mixture and our EM
BACKENDS = {"sklearn (Dirichlet-process VI)": {"mixture": "dirichlet", "backend": "sklearn"},
            "torch (EM)": {"mixture": "gmm", "backend": "torch"}}


def load_outputs(overrides: list[str], run_dir: Path, ood: str | None):
    """(train, id_test, OOD set name, its outputs, setting) of the composed config's backbone."""
    from ood_lightning.run.build import build_data, build_model, choices, connect, feature_cache
    from ood_lightning.scoring.feature_cache import model_fingerprint
    from ood_lightning.scoring.loop import split_outputs

    cfg = compose_train(overrides, run_dir)
    picked = choices()
    dm = build_data(cfg)
    dm.setup("test")
    model = build_model(cfg, dm.num_classes)
    connect(dm, model)
    model = model.eval()
    device = torch.device("cpu")
    cache = feature_cache(cfg, model)
    fingerprint = model_fingerprint(model) if cache is not None else None
    preprocess = dm.preprocess.to(device)
    loaders = dm.eval_dataloaders()
    sets = [s for s in loaders if s not in ("id_val", "id_test")]
    if not sets:
        raise ConfigError("no OOD set configured: pass ood=<group> (default ood=odin)")
    ood = ood or sets[0]
    if ood not in sets:
        raise ConfigError(f"--ood {ood!r} is not one of the configured OOD sets {sets}")
    limit = cfg.evaluation.fit_limit
    train = split_outputs(model, dm, "id_train", dm.fit_dataloader(limit), preprocess, device, cache, fingerprint,
                          limit=limit, augment=bool(cfg.evaluation.fit_augmented))
    test = split_outputs(model, dm, "id_test", loaders["id_test"], preprocess, device, cache, fingerprint)
    out = split_outputs(model, dm, ood, loaders[ood], preprocess, device, cache, fingerprint)
    setting = {"backbone": picked.get("backbone"), "data": str(cfg.data.name), "ood": ood,
               "ood_dataset": str(cfg.ood[ood].dataset), "fit_samples": len(train),
               "fit_augmented": bool(cfg.evaluation.fit_augmented), "seed": int(cfg.seed),
               "overrides": overrides}
    return train, test, out, setting


def compare(train, test, ood_out, layer: str, n_components, max_iter: int, seed: int) -> list[dict]:
    """One row per backend: the fit's held-out log-likelihood, AUROC, size and wall time."""
    rows = []
    for label, choice in BACKENDS.items():
        det = LSGM(layers=[layer], n_components=n_components, max_iter=max_iter, standardize=False, pca_dim=None,
                   seed=seed, **choice)
        start = time.perf_counter()
        det.fit_outputs(train)
        fit_s = time.perf_counter() - start
        est = det.models[layer].estimator
        id_ll, ood_ll = det.score(None, test), det.score(None, ood_out)
        rows.append({"backend": label, **choice, "components": det.models[layer].n_components,
                     "effective_components": int((det.models[layer].log_weights.exp() > 1e-3).sum()),
                     "iterations": int(est.n_iter_), "converged": bool(est.converged_),
                     "heldout_id_loglik": float(id_ll.mean()), "ood_loglik": float(ood_ll.mean()),
                     "auroc": auroc(id_ll, ood_ll), "fit_s": round(fit_s, 1)})
        log.info("%s: held-out ID log-likelihood %.2f, AUROC %.4f, fit %.0f s", label,
                 rows[-1]["heldout_id_loglik"], rows[-1]["auroc"], fit_s)
    return rows


def markdown(rows: list[dict], setting: dict, command: str, commit: dict, machine: dict) -> str:
    s = setting
    sha = (commit.get("sha") or "unknown")[:12] + (" (with uncommitted changes)" if commit.get("dirty") else "")
    lines = [f"# LSGM mixture fit: scikit-learn's variational DP mixture vs our torch EM ({s['backbone']}, "
             f"layer `{s['layer']}`)", "",
             "Written by the command below; do not edit by hand.", "",
             f"- command: `{command}`",
             f"- commit: `{sha}`",
             f"- machine: {provenance.describe_machine(machine)}; wall time {s['wall_s']:.0f} s",
             f"- setting: ID `{s['data']}` (lossless), {s['fit_samples']:,} plain training inputs (the whole fit "
             f"split, not augmented), layer `{s['layer']}` ({s['feature_dim']}-d), no standardisation, no PCA "
             f"(the paper's features), {s['n_components']} components (truncation level for the DP mixture), "
             f"max_iter {s['max_iter']}, reg_covar 1e-4, seed {s['seed']}",
             f"- held-out ID = the {s['heldout']:,} ID test inputs; OOD = `{s['ood']}` ({s['ood_dataset']}, "
             f"{s['ood_n']:,} inputs); score = the layer's mixture log-density (a one-layer LSGM)", "",
             "| backend | held-out ID log-likelihood (nats / input) | OOD log-likelihood | AUROC (ID test vs OOD) "
             "| components (weight > 1e-3) | iterations | converged | fit (s) |",
             "|---|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        lines.append(f"| {r['backend']} | {r['heldout_id_loglik']:.2f} | {r['ood_loglik']:.2f} | {100 * r['auroc']:.2f} "
                     f"| {r['effective_components']} of {r['components']} | {r['iterations']} | "
                     f"{'yes' if r['converged'] else 'no'} | {r['fit_s']:.0f} |")
    ref, em = rows[0], rows[-1]
    as_good = em["heldout_id_loglik"] >= ref["heldout_id_loglik"] - 0.5 and em["auroc"] >= ref["auroc"] - 0.005
    lines += ["", f"Verdict (rule: EM within 0.5 nats of the variational fit's held-out log-likelihood and within "
              f"0.5 AUROC points): the torch EM is {'as good as' if as_good else 'NOT as good as'} scikit-learn's "
              f"variational fit here.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layer", default="penultimate", help="one layer of the backbone's outputs (default penultimate)")
    ap.add_argument("--ood", default=None, help="the OOD set to take AUROC against (default: the first configured)")
    ap.add_argument("--n-components", default="paper", help="components per layer (default: the paper's, 50 on CIFAR-10)")
    ap.add_argument("--max-iter", type=int, default=100)
    ap.add_argument("--out", type=Path, default=Path("outputs/lsgm_backends.md"))
    ap.add_argument("overrides", nargs="*", help="train.py overrides (backbone=..., ood=..., seed=...)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    torch.set_num_threads(1)
    command, commit, machine = provenance.command(), provenance.commit(), provenance.machine()
    keys = {o.split("=", 1)[0] for o in args.overrides}
    overrides = [o for o in DEFAULT_OVERRIDES if o.split("=", 1)[0] not in keys] + list(args.overrides)
    start = time.perf_counter()
    try:
        k = args.n_components if args.n_components in ("paper", "auto") else int(args.n_components)
        train, test, ood_out, setting = load_outputs(overrides, Path("outputs") / "lsgm_backends", args.ood)
        if args.layer not in train.layers:
            raise ConfigError(f"--layer {args.layer!r} is not one of the backbone's layers {list(train.layers)}")
        rows = compare(train, test, ood_out, args.layer, k, args.max_iter, setting["seed"])
    except OODLightningError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    machine["load_1min_end"] = provenance.load_average()
    setting.update(layer=args.layer, feature_dim=int(train.layers[args.layer].shape[1]), n_components=rows[0]["components"],
                   max_iter=args.max_iter, heldout=len(test), ood_n=len(ood_out),
                   wall_s=round(time.perf_counter() - start, 1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(rows, setting, command, commit, machine))
    args.out.with_suffix(".json").write_text(json.dumps({"command": command, "commit": commit, "machine": machine,
                                                         "setting": setting, "rows": rows}, indent=2))
    print(args.out.read_text())
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
