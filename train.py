"""Train a method, score it against every OOD set, write metrics.json / scores.npz / plots.

    python train.py                                   # demo: CNN on MNIST 0-5 (CPU, ~2 min)
    python train.py data=cifar10 backbone=resnet18 ood=[odin,mnist,noise]
    python train.py -m seed=0,1,2                     # multirun; aggregate with evaluate.py
"""

import sys

from ood_lightning.run.typos import exit_on_unknown_key

if __name__ == "__main__":
    exit_on_unknown_key("train")  # a mistyped key: one line, before the slow imports below

from ood_lightning.core.cpu_runtime import configure_threads

configure_threads()  # before torch loads OpenMP: it reads OMP_* once

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

import ood_lightning.run.config  # noqa: E402,F401  (registers the config resolvers)
from ood_lightning.core.console import quiet_known_noise  # noqa: E402
from ood_lightning.run.checks import check_cli_overrides  # noqa: E402
from ood_lightning.run.cli import run_safely  # noqa: E402
from ood_lightning.run.runs import train  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig):
    quiet_known_noise()
    return run_safely(train, cfg)


if __name__ == "__main__":
    check_cli_overrides(sys.argv[1:])  # a typo in trainer.<key>: one line, before Hydra's own error
    main()
