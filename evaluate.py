"""Aggregate runs into mean ± std tables, or re-score a checkpoint.

    python evaluate.py run_dir=outputs/train/multirun/<date>
    python evaluate.py ckpt_path=<run>/checkpoints/last.ckpt ood=[odin,noise] detectors=baselines
"""

import hydra
from omegaconf import DictConfig
from rich.console import Console
from rich.markdown import Markdown

import ood_lightning.config  # noqa: F401  (registers the config resolvers)
from ood_lightning.errors import ConfigError
from ood_lightning.training import run_safely


def evaluate(cfg: DictConfig):
    if cfg.get("run_dir"):
        from ood_lightning.evaluation.aggregate import write_summary

        md, csv_path, rows, failed = write_summary(cfg.run_dir)
        Console().print(Markdown(md.read_text()))
        print(f"wrote {md} and {csv_path}")
        return rows
    if cfg.get("ckpt_path"):
        from ood_lightning.evaluation.rescoring import rescore

        return rescore(cfg)
    raise ConfigError("nothing to do: pass run_dir=<multirun dir> to aggregate, or ckpt_path=<.ckpt> to re-score")


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig):
    return run_safely(evaluate, cfg)


if __name__ == "__main__":
    main()
