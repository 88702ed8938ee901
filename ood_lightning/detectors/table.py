"""The detector table, docs/detectors.md, written from the detector configs and classes:

    python -m ood_lightning.detectors.table > docs/detectors.md

One row per detector class of ``detectors=all`` (``conf/detectors/baselines.yaml`` then ``all.yaml``),
in config order, with every config key that builds it; the rest of the row is the class's ``card``.
``tests/test_detector_table.py`` checks that the committed page is this command's output."""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

import ood_lightning.detectors as detectors
from ood_lightning.core.errors import ConfigError

#: the config files of ``detectors=all``, in the order their entries are listed
CONFIGS = ("baselines.yaml", "all.yaml")
PREFIX = "ood_lightning.detectors."

INTRO = """<!-- written by `python -m ood_lightning.detectors.table > docs/detectors.md` from conf/detectors/ and each
detector class's `card`: edit those, not this page -->

# Post-hoc detectors

Every detector is a `ood_lightning.scoring.api.Scorer` (higher score = more in-distribution)
configured in `conf/detectors/`. `detectors=baselines` runs MSP, ODIN, Energy, ReAct,
Mahalanobis (+ its all-layer ensemble), KNN, ViM and MaxLogit; `detectors=all` adds the rest.
All of them read the one shared forward pass (cached logits / penultimate features) except ODIN,
which perturbs the inputs (its own gradient pass per split). "Fit" means a pass over the ID
training split, capped at `evaluation.fit_limit` samples (20000 by default); a fit set smaller
than a detector needs (KNN's k, a class without samples, ...) is refused with a `ConfigError`
naming the key to change. Detectors marked *head* read the weights of the linear classifier
`model.head` and refuse methods whose `classify` is not that linear map on the penultimate
features (e.g. VMDLS, G-ODIN).
"""

OUTRO = """Cross-checked sample by sample against pytorch-ood 0.4.0 in `tests/test_pytorch_ood_crosscheck.py`
(sign flipped). Where the libraries legitimately differ the test asserts the relation:
Mahalanobis = 2N × pytorch-ood's (it halves the distance and uses the unnormalised scatter),
RMDS = N × pytorch-ood's (unnormalised covariances), GEN = C × pytorch-ood's (it averages the
top-M terms), temperature scaling (pytorch-ood stops L-BFGS after 50 steps; ours converges, with an
NLL no worse). AUPR: ours is scikit-learn's average precision, pytorch-ood integrates the same
precision-recall curve with the trapezoidal rule.
"""


def detector_classes(conf_dir: str | Path) -> dict[type, list[str]]:
    """Each detector class of ``detectors=all`` -> its config keys, in config order. Only names
    exported by :mod:`ood_lightning.detectors` are resolved: a config file is data, never code."""
    classes: dict[type, list[str]] = {}
    for name in CONFIGS:
        entries = yaml.safe_load((Path(conf_dir) / "detectors" / name).read_text())
        for key, entry in entries.items():
            if key == "defaults":
                continue
            target = entry["_target_"]
            if not target.startswith(PREFIX) or target[len(PREFIX):] not in detectors.__all__:
                raise ConfigError(f"conf/detectors/{name}: {key}._target_={target} is not a class of ood_lightning.detectors")
            classes.setdefault(getattr(detectors, target[len(PREFIX):]), []).append(key)
    return classes


def table(conf_dir: str | Path) -> str:
    rows = ["| detector (config key) | paper | needs | our defaults and where they come from |", "|---|---|---|---|"]
    for cls, keys in detector_classes(conf_dir).items():
        card = cls.card
        names = ", ".join(f"`{k}`" for k in keys)
        rows.append(f"| {card.label} ({names}) | {card.paper} | {card.needs} | {card.defaults} |")
    return "\n".join(rows) + "\n"


def page(conf_dir: str | Path) -> str:
    return INTRO + "\n" + table(conf_dir) + "\n" + OUTRO


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conf", default="conf", help="the project's conf/ folder (default: ./conf)")
    print(page(parser.parse_args().conf), end="")


if __name__ == "__main__":
    main()
