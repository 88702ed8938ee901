"""Aggregate runs into mean ± std tables, or re-score a checkpoint.

    python evaluate.py run_dir=outputs/train/multirun/<date>
    python evaluate.py run_dir=<multirun> plot=lambda            # DHM Fig. 3 (plot=spectral_coeff: Fig. 4)
    python evaluate.py run_dir=<multirun> compare=[dhm,msp]      # Table 1: detectors side by side
    python evaluate.py run_dir=<run or multirun> paper=lde       # ours beside a paper's numbers (or paper=all)
    python evaluate.py ckpt_path=<run>/checkpoints/last.ckpt ood=[odin,noise] detectors=baselines
"""

from pathlib import Path

from ood_lightning.run.typos import exit_on_unknown_key

if __name__ == "__main__":
    exit_on_unknown_key("evaluate")  # a mistyped key: one line, before the slow imports below

from ood_lightning.core.cpu_runtime import configure_threads

configure_threads()  # before torch loads OpenMP: it reads OMP_* once

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402
from rich.markdown import Markdown  # noqa: E402

import ood_lightning.run.config  # noqa: E402,F401  (registers the config resolvers)
from ood_lightning.core.console import quiet_known_noise  # noqa: E402
from ood_lightning.core.errors import ConfigError  # noqa: E402
from ood_lightning.evaluation.results import wide_console  # noqa: E402
from ood_lightning.run.cli import run_safely  # noqa: E402


def evaluate(cfg: DictConfig):
    if cfg.get("paper") and not cfg.get("run_dir"):
        raise ConfigError("paper= compares a finished run with a paper: pass run_dir=<run or multirun dir> too")
    if cfg.get("run_dir"):
        from ood_lightning.evaluation.aggregate import write_summary, write_summary_artifacts

        md, csv_path, rows, failed = write_summary(cfg.run_dir)
        wide_console().print(Markdown(md.read_text()))
        from ood_lightning.evaluation.plots import auroc_heatmap

        heatmap = auroc_heatmap(rows, Path(cfg.run_dir) / "summary_auroc.png")
        print(f"wrote {md}, {csv_path} and {heatmap}")
        figures = [heatmap, *_sweep_outputs(cfg, rows)]
        print(f"wrote {write_summary_artifacts(cfg.run_dir, figures)}")
        _log_summary(cfg, rows, csv_path, figures)
        return rows
    if cfg.get("ckpt_path"):
        from ood_lightning.run.runs import rescore

        return rescore(cfg)
    raise ConfigError("nothing to do: pass run_dir=<multirun dir> to aggregate, or ckpt_path=<.ckpt> to re-score")


def _log_summary(cfg: DictConfig, rows: list[dict], csv_path: Path, figures: list[Path]) -> None:
    """``logger=wandb``: the summary as a W&B Table (the columns of summary.csv), in a run that joins
    the sweep's W&B group (the run_dir's name) as ``summary``; the figures (heatmap, sweep plot) to
    every configured logger that takes images."""
    from ood_lightning.run.loggers import build_loggers, log_summary

    loggers = build_loggers(cfg, {"group": Path(cfg.run_dir).resolve().name, "name": "summary"})
    if loggers:
        columns = csv_path.read_text().splitlines()[0].split(",")
        log_summary(loggers, rows, columns, figures)


def _sweep_outputs(cfg: DictConfig, rows: list[dict]) -> list[Path]:
    """``compare=[...]``: Table-1 view (detectors side by side) in compare.md; ``plot=lambda|spectral_coeff``:
    the sweep figure (+ its numbers as .csv) next to summary.md; ``paper=<name|all>``: ours beside the
    paper's published numbers in paper_compare.md. Returns the figures written."""
    from ood_lightning.evaluation.sweep_plots import plot_sweep, side_by_side

    if cfg.get("compare"):
        text = side_by_side(rows, list(cfg.compare), list(cfg.get("compare_metrics") or ["auroc", "aupr_in", "autc"]),
                            title=f"{' vs '.join(cfg.compare)} (×100, mean ± std over seeds; AuTC: lower is better)")
        path = Path(cfg.run_dir) / "compare.md"
        path.write_text(text)
        wide_console().print(Markdown(text))
        print(f"wrote {path}")
    if cfg.get("paper"):
        from ood_lightning.evaluation.paper_compare import write_paper_compare

        path, text = write_paper_compare(cfg.run_dir, cfg.paper)
        wide_console().print(Markdown(text))
        print(f"wrote {path}")
    if cfg.get("plot"):
        path = plot_sweep(cfg.plot, cfg.run_dir, list(cfg.get("plot_detectors") or ["dhm"]))
        print(f"wrote {path} and {path.with_suffix('.csv')}")
        return [path]
    return []


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig):
    quiet_known_noise()
    return run_safely(evaluate, cfg)


if __name__ == "__main__":
    main()
