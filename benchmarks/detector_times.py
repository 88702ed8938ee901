"""Fit and score wall time per post-hoc detector on a trained checkpoint, and the same detectors
through pytorch-ood's per-detector loop (each detector its own passes over the loaders), in the
same process on the same inputs; docs/results/detectors_demo.md reports one run.

    OOD_LIGHTNING_DATA=../shared/data python benchmarks/detector_times.py <run>/checkpoints/last.ckpt <out_dir>

Needs the Scorer evaluation (ood_lightning.run, ood_lightning.scoring.passes) and pytorch-ood
(the ``test`` extra). Writes ``<out_dir>/times.json``: our fit/score seconds and AUROC / FPR@95 per
detector and OOD set, pytorch-ood's seconds per detector, and the speed ratio on the shared ones.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

from ood_lightning.core.checkpoints import SCRIPT_OPT_IN
from ood_lightning.data.datamodule import OODDataModule
from ood_lightning.evaluation import metrics as M
from ood_lightning.run.build import build_detectors, build_model, connect, load_weights, stored_config
from ood_lightning.run.cli import exit_on_error
from ood_lightning.run.config import compose
from ood_lightning.scoring.api import FitData
from ood_lightning.scoring.passes import extract

ROOT = Path(__file__).resolve().parents[1]


class Preprocessed(nn.Module):
    """The model on raw loader batches (pytorch-ood calls ``model(x)`` on what the loader yields)."""

    def __init__(self, model: nn.Module, preprocess) -> None:
        super().__init__()
        self.m, self.preprocess = model, preprocess

    def features(self, x):
        return self.m.forward_features(self.preprocess(x))["penultimate"]

    def maps(self, x):
        return self.features(x)[:, :, None, None]

    def head_of_maps(self, maps):
        return self.m.head(maps.flatten(1))

    def forward(self, x):
        return self.m(self.preprocess(x))


def ours(model, dm, fit_limit: int, device) -> tuple[float, dict]:
    pre = dm.preprocess.to(device)
    loaders = dm.eval_dataloaders()
    start = time.perf_counter()
    train = extract(model, dm.fit_dataloader(fit_limit), pre, device)
    outs = {split: extract(model, loader, pre, device) for split, loader in loaders.items()}
    rows = {"extract_s": time.perf_counter() - start}
    for name, det in build_detectors(compose("train", ["detectors=all"], "/tmp/unused", ROOT / "conf")).items():
        start = time.perf_counter()
        if det.needs_fit:
            det.fit(model, FitData(train=train))
        fit_s = time.perf_counter() - start
        start = time.perf_counter()
        scores = {split: (torch.cat([det.score_batch(model, pre(x.to(device))) for x, _ in loaders[split]])
                          if det.per_batch else det.score(model, out)) for split, out in outs.items()}
        rows[name] = {"fit_s": fit_s, "score_s": time.perf_counter() - start}
        for split, s in scores.items():
            if split not in ("id_val", "id_test"):
                rows[name][split] = {"auroc": 100 * M.auroc(scores["id_test"], s),
                                     "fpr95": 100 * M.fpr_at_tpr(scores["id_test"], s)}
    return rows["extract_s"], rows


def pytorch_ood(model, dm, fit_limit: int, device) -> dict:
    from pytorch_ood import detector as P

    net = Preprocessed(model, dm.preprocess.to(device))
    head = model.head
    makers = {
        "msp": lambda: P.MaxSoftmax(net), "energy": lambda: P.EnergyBased(net), "maxlogit": lambda: P.MaxLogit(net),
        "entropy": lambda: P.Entropy(net), "gen": lambda: P.GEN(net, gamma=0.1),
        # ODIN perturbs the preprocessed (float) input, as ours
        "odin": lambda: P.ODIN(model, eps=0.0014, temperature=1000.0, norm_std=list(dm.cfg.get("std") or [1.0])),
        "react": lambda: P.ReAct(backbone=net.maps, head=net.head_of_maps, percentile=0.9),
        "mahalanobis": lambda: P.Mahalanobis(net.features), "knn": lambda: P.KNN(net.features, k=50),
        "vim": lambda: P.ViM(net.features, d=head.in_features // 2, w=head.weight, b=head.bias),
        "kl_matching": lambda: P.KLMatching(net), "temperature_scaling": lambda: P.TemperatureScaling(net),
        "gradnorm": lambda: P.GradNorm(net, param_filter=lambda n: n == "m.head.weight"),
        "dice": lambda: P.DICE(net.features, w=head.weight, b=head.bias, p=0.9),
        "ash_s": lambda: P.ASH(backbone=net.maps, head=net.head_of_maps, variant="ash-s", percentile=0.9),
        "scale": lambda: P.SCALE(backbone=net.maps, head=net.head_of_maps, percentile=0.85),
        "she": lambda: P.SHE(net.features, head), "rmds": lambda: P.RMD(net.features),
        "fdbd": lambda: P.fDBD(net.features, head), "nnguide": lambda: P.NNGuide(net.features, head, k=10),
    }
    fit_loader, loaders = dm.fit_dataloader(fit_limit), dm.eval_dataloaders()
    seconds = {}
    for name, make in makers.items():
        det = make()
        start = time.perf_counter()
        if name == "temperature_scaling":  # fit(loader) needs labelled logits: the same training logits as ours
            with torch.no_grad():
                batches = [(net(x.to(device)), y) for x, y in fit_loader]
            det.fit_logits(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))
        elif det.requires_fit:
            det.fit(fit_loader)
        for loader in loaders.values():
            for x, _ in loader:
                if name == "odin":  # it needs gradients, w.r.t. the preprocessed input
                    det.predict(net.preprocess(x.to(device)))
                elif name == "gradnorm":  # it needs gradients
                    det.predict(x.to(device))
                else:
                    with torch.no_grad():
                        det.predict(x.to(device))
        seconds[name] = time.perf_counter() - start
    return seconds


def main(ckpt: str, out_dir: str, allow_unsafe: bool = False) -> None:
    torch.set_num_threads(1)
    trained = stored_config(ckpt, allow_unsafe, opt_in=SCRIPT_OPT_IN)
    fit_limit = int(compose("train", [], "/tmp/unused", ROOT / "conf").evaluation.fit_limit)
    dm = OODDataModule(trained.data, trained.ood)
    dm.setup("test")
    model = build_model(trained, dm.num_classes, pretrained=False)
    connect(dm, model)
    load_weights(model, ckpt, allow_unsafe)
    model.eval()
    device = torch.device("cpu")
    extract_s, rows = ours(model, dm, fit_limit, device)
    theirs = pytorch_ood(model, dm, fit_limit, device)
    shared = [n for n in theirs if n in rows]
    ours_shared = extract_s + sum(rows[n]["fit_s"] + rows[n]["score_s"] for n in shared)
    result = {"ours": rows, "pytorch_ood_s": theirs, "shared": shared, "ours_shared_s": ours_shared,
              "pytorch_ood_shared_s": sum(theirs[n] for n in shared),
              "speed_ratio": sum(theirs[n] for n in shared) / ours_shared}
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "times.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "ours"}, indent=1))


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != SCRIPT_OPT_IN]
    if len(args) != 2:
        sys.exit(f"usage: {__doc__.split(chr(10) + chr(10))[1].strip()} [{SCRIPT_OPT_IN}]")
    exit_on_error(lambda: main(*args, allow_unsafe=SCRIPT_OPT_IN in sys.argv[1:]))
