"""Sending a run's metrics and figures to the configured Lightning loggers."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger


def log_results(loggers, metrics: dict, plots: list[Path], step: int) -> None:
    """Every metric (``ood/<detector>/<set>/<metric>``) and every figure of the run to each logger."""
    flat = {f"ood/{det}/{ood}/{k}": v for det, rows in metrics["results"].items() for ood, m in rows.items()
            for k, v in m.items()}
    if metrics.get("accuracy") is not None:
        flat["test/acc"] = metrics["accuracy"]
    for logger in loggers:
        logger.log_metrics(flat, step=step)
        for plot in plots:
            log_image(logger, f"ood/{plot.stem}", plot, step)
        logger.save()


def log_image(logger, key: str, path: Path, step: int) -> None:
    """A PNG to the loggers that take images (W&B, TensorBoard); others keep the file only."""
    if isinstance(logger, WandbLogger):
        logger.log_image(key=key, images=[str(path)])
    elif isinstance(logger, TensorBoardLogger):
        import matplotlib.image as mpimg

        logger.experiment.add_image(key, mpimg.imread(path)[..., :3], step, dataformats="HWC")
