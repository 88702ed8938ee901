"""The console a person reads: third-party notices that say nothing about this run are dropped
where they are made, each by its exact text (no blanket filter that could hide a real warning),
and the model summary is one line of parameter counts."""

from __future__ import annotations

import logging
import warnings

import lightning as L

_RANK_ZERO = "lightning.pytorch.utilities.rank_zero"
#: (logger name, start of the message) of third-party notices to drop: Lightning's litlogger
#: advertisement; its accelerator lines (the parameter summary names the device the run trains on);
#: its "fit stopped: max_epochs reached" (the last epoch line says so)
_NOTICES = ((_RANK_ZERO, "💡 Tip: For seamless cloud logging"), (_RANK_ZERO, "GPU available: "),
            (_RANK_ZERO, "TPU available: "), (_RANK_ZERO, "`Trainer.fit` stopped: `max_epochs="))


class _DropNotice(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(self.prefix)


def quiet_known_noise() -> None:
    """Idempotent. The notices above, and torch's FutureWarning about ``LeafSpec`` that Lightning's
    own pytree helper triggers on every step with this torch version."""
    for name, prefix in _NOTICES:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNotice) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropNotice(prefix))
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning)


def _count(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.1f} K" if n >= 1e3 else str(n)


class ParameterSummary(L.Callback):
    """One line instead of Lightning's table (whose FLOPs column reads 0 without an example input):
    parameters per top-level module, how many train, and the device and precision they train in."""

    def on_fit_start(self, trainer: L.Trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        parts = ", ".join(f"{name} {type(m).__name__} {_count(sum(p.numel() for p in m.parameters()))}"
                          for name, m in pl_module.named_children())
        trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        logging.getLogger(__name__).info("model %s: %s; %s trainable parameters; training on %s (%s)",
                                         type(pl_module).__name__, parts, _count(trainable),
                                         trainer.strategy.root_device, trainer.precision)
