"""Building the configured Lightning loggers, and sending a run's metrics and figures, or a
sweep's summary table, to them.

W&B in a multirun: every job's run gets ``group`` = the sweep folder's name and ``name`` = the
job's swept overrides (``lambda=0.1,seed=2``), unless ``logger.wandb.group`` / ``.name`` are
set; the aggregation (``evaluate.py run_dir=<sweep> logger=wandb``) joins the same group as
``name=summary``. They are filled in when the logger is built, not in the config, so the config
hash of ``skip_finished`` does not depend on the sweep folder's name."""

from __future__ import annotations

import logging
from pathlib import Path

import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import get_class, instantiate
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from omegaconf import DictConfig

log = logging.getLogger(__name__)


class QuietWandbLogger(WandbLogger):
    """Lightning's ``WandbLogger`` without the ``anonymous`` argument when it is not asked for, and
    with W&B's ``quiet`` setting (``quiet=False`` to undo).

    Lightning passes ``anonymous=None`` to ``wandb.init`` whatever it is given, and wandb >= 0.19
    warns about any ``anonymous`` setting that is not left unset ("The anonymous setting has no
    effect and will be removed"): a warning on every W&B run that no config of ours can avoid.
    ``anonymous=True`` is still passed on (and warned about, rightly). ``quiet`` drops W&B's closing
    footer (a sparkline and the last value of every metric, over 40 lines that repeat the run's own
    table); its opening lines, which say where the run's data is and how to sync it, stay."""

    def __init__(self, *args, anonymous: bool | None = None, quiet: bool = True, **kwargs) -> None:
        if quiet and "settings" not in kwargs:
            import wandb

            kwargs["settings"] = wandb.Settings(quiet=True)
        super().__init__(*args, anonymous=anonymous, **kwargs)
        if not anonymous:
            self._wandb_init.pop("anonymous", None)


def sweep_run_fields() -> dict:
    """``group`` and ``name`` for this job's W&B run in a multirun; empty outside one (a single
    run keeps W&B's own naming)."""
    try:
        hc = HydraConfig.get()
    except ValueError:
        return {}
    if hc.mode != RunMode.MULTIRUN:
        return {}
    job = [str(o) for o in hc.overrides.task]
    swept = swept_keys(Path(hc.sweep.dir) / "multirun.yaml")
    chosen = [o for o in job if _key(o) in swept] or job
    return {"group": Path(hc.sweep.dir).name, "name": ",".join(chosen) or None}


def swept_keys(multirun_yaml: Path) -> set[str]:
    """The keys a sweep varies: its command-line sweeps (``seed=0,1``) and ``hydra.sweeper.params``,
    read from the sweep's ``multirun.yaml`` (empty when it is absent or unreadable)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        hydra_cfg = (yaml.safe_load(multirun_yaml.read_text()) or {})["hydra"]
        task = [str(t) for t in hydra_cfg["overrides"]["task"] or []]
        keys = {o.key_or_group for o in OverridesParser.create().parse_overrides(task) if o.is_sweep_override()}
        params = (hydra_cfg.get("sweeper") or {}).get("params") or {}
    except Exception as err:  # noqa: BLE001 - no file or a foreign one: the job's overrides name it
        log.debug("no swept keys from %s: %s", multirun_yaml, err)
        return set()
    return keys | set(params)


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~").split("@", 1)[0]


def build_loggers(cfg: DictConfig, run_fields: dict | None = None) -> list:
    """Every logger under ``cfg.logger``; a W&B logger whose ``group`` / ``name`` is unset gets
    ``run_fields`` (default: :func:`sweep_run_fields`)."""
    fields = sweep_run_fields() if run_fields is None else run_fields
    loggers = []
    for spec in (cfg.get("logger") or {}).values():
        if spec is None:
            continue
        extra = {}
        if issubclass(get_class(spec._target_), WandbLogger):
            extra = {k: v for k, v in fields.items() if v is not None and spec.get(k) is None}
        loggers.append(instantiate(spec, **extra))
    return loggers


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


def finish_runs(loggers) -> None:
    """Close each W&B run once its job has logged everything: Hydra's basic launcher runs a
    multirun's jobs in one process, and an open run would be reused by the next job's logger."""
    for logger in loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger.experiment.finish()


def log_summary(loggers, rows: list[dict], columns: list[str], plots: list[Path]) -> None:
    """A sweep's summary (one row per setting × detector × OOD set, the columns of summary.csv) as a
    W&B Table, and its figures to every logger that takes images."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.log_table(key="summary", columns=columns, data=[[r.get(c) for c in columns] for r in rows])
        for plot in plots:
            log_image(logger, f"summary/{plot.stem}", plot, 0)
        logger.save()


def log_image(logger, key: str, path: Path, step: int) -> None:
    """A PNG to the loggers that take images (W&B, TensorBoard); others keep the file only."""
    if isinstance(logger, WandbLogger):
        logger.log_image(key=key, images=[str(path)])
    elif isinstance(logger, TensorBoardLogger):
        import matplotlib.image as mpimg

        logger.experiment.add_image(key, mpimg.imread(path)[..., :3], step, dataformats="HWC")
