"""Runtime choices for a device: which device scores, channels_last and compile, how often the
loss is read for the NaN check, and giving every DDP rank rank 0's state."""

from __future__ import annotations

import logging
import weakref

import torch
from omegaconf import DictConfig

from ood_lightning.core.cpu_runtime import fast_bf16
from ood_lightning.core.errors import ConfigError
from ood_lightning.nn.spectral import BoundedBatchNorm
from ood_lightning.run.config import to_dict

log = logging.getLogger(__name__)

#: training steps between host reads of the loss on CUDA (one sync each; ~1 ms of a WRN step)
NAN_CHECK_EVERY_CUDA = 50


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def check_accelerator(cfg: DictConfig) -> None:
    """Fail before any data is read when the config asks for a GPU this machine lacks."""
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.accelerator={accelerator} but no CUDA device is visible "
                          "(GPU presets such as experiment=dhm_cifar10 select trainer=gpu): add trainer=cpu to run on CPU")


def apply_speedups(model, cfg: DictConfig, device: torch.device) -> dict:
    """The top-level ``channels_last`` and ``compile`` keys, applied to ``model.backbone`` for ``device``.

    - ``channels_last: auto|true|false``: NHWC weights and inputs for conv backbones (tensor
      cores read NHWC without transposes); for training ``auto`` = on CUDA only (see
      :func:`resolve_channels_last`; the evaluation's own choice is :func:`apply_eval_layout`).
      Inputs are converted by a forward pre-hook on the backbone.
    - ``compile: false|true|{torch.compile kwargs}``: ``torch.compile`` of the backbone's
      ``__call__`` (``nn.Module.compile``, so state_dict keys and checkpoints are unchanged).
      Only the backbone: heads are one matmul, and the residual flow's training log-det
      (Russian-roulette series length drawn per step, ``autograd.grad`` inside the forward)
      breaks graphs on every step. Direct calls of ``forward_features`` (the evaluation's
      feature extraction) stay eager.

    On CPU with the defaults both are no-ops. Returns what was applied (for logs and the benchmark).
    """
    backbone = model.backbone
    applied = {"channels_last": False, "compile": False}
    precision = str((cfg.get("trainer") or {}).get("precision", "32-true"))
    bf16 = precision.startswith("bf16")
    if bf16 and device.type == "cpu" and not fast_bf16():
        log.warning("trainer.precision=%s on a CPU without AMX: bf16 is emulated here and much slower than "
                    "float32 (docs/performance.md); trainer.precision=32-true is faster on this machine", precision)
    if resolve_channels_last(cfg.get("channels_last", "auto"), device, "train", bf16):
        applied["channels_last"] = _to_channels_last(backbone)
    options = cfg.get("compile", False)
    if options and any(isinstance(m, BoundedBatchNorm) for m in backbone.modules()):
        # measured on torch 2.14.1 (tests/test_spectral.py): under AOT autograd the bound's gradient
        # w.r.t. γ is NaN (a full max) or off by ~3% (max over dim 0), while eager autograd is exact
        raise ConfigError("compile= with a spectrally bounded BatchNorm gives wrong gradients in torch.compile "
                          "(measured on this torch): drop compile, or leave BatchNorm free with "
                          "method.spectral_bn=false (backbone.spectral_bn=false outside DHM)")
    if options:
        kwargs = {} if options is True else to_dict(options)
        backbone.compile(**kwargs)
        applied["compile"] = kwargs or True
    if any(applied.values()):
        log.info("backbone speedups on %s: %s", device, applied)
    return applied


def resolve_channels_last(choice, device: torch.device, stage: str, bf16: bool = False) -> bool:
    """What ``channels_last: auto|true|false`` means for ``stage`` (``train`` or ``eval``) on ``device``.

    ``auto`` is on CUDA for both stages; on the CPU for evaluation (NHWC made the published
    ResNet-56's feature extraction 1.2-1.4x faster, benchmarks/extraction_speed.py) and for
    training in bf16 (``bf16``: oneDNN's bf16 kernels want NHWC; bf16 on NCHW tensors reorders
    around every conv), while fp32 CPU training keeps NCHW.
    """
    text = str(choice).lower()
    if text not in ("auto", "true", "false"):
        raise ConfigError(f"channels_last={choice!r}: choose auto, true or false")
    if text == "auto":
        return device.type == "cuda" or stage == "eval" or bf16
    return text == "true"


#: backbones already converted (weights NHWC, input pre-hook registered), so a second call adds no hook
_CHANNELS_LAST: weakref.WeakSet = weakref.WeakSet()


def _to_channels_last(backbone: torch.nn.Module) -> bool:
    """NHWC weights and a pre-hook that converts 4-D inputs; False (untouched) without a conv."""
    if not any(isinstance(m, torch.nn.Conv2d) for m in backbone.modules()):
        return False
    if backbone not in _CHANNELS_LAST:
        backbone.to(memory_format=torch.channels_last)
        backbone.register_forward_pre_hook(_channels_last_input)
        _CHANNELS_LAST.add(backbone)
    return True


def apply_eval_layout(model, cfg: DictConfig, device: torch.device) -> bool:
    """channels_last for the OOD evaluation's passes on ``device`` (``auto``: on CUDA and on the
    CPU, :func:`resolve_channels_last`); outputs equal NCHW's up to float rounding. Returns
    whether the backbone is NHWC now."""
    if not resolve_channels_last(cfg.get("channels_last", "auto"), device, "eval"):
        return False
    done = _to_channels_last(model.backbone)
    if done:
        log.info("evaluation on %s: backbone in channels_last (channels_last=%s)", device, cfg.get("channels_last", "auto"))
    return done


#: ``evaluation.precision`` -> the autocast dtype of the evaluation passes' backbone (None = float32)
EVAL_PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


def apply_eval_precision(model, cfg: DictConfig, device: torch.device) -> torch.dtype | None:
    """``evaluation.precision: fp32|bf16``: the dtype of the evaluation passes' backbone and head
    (autocast, :func:`ood_lightning.scoring.passes.extract`). Their outputs are cast to float32, so
    every fit and density (Mahalanobis, GMMs, flows, a DHM's log-det) runs in float32; the
    input-gradient detectors' own passes (ODIN, Mahalanobis*) stay float32. fp32 is the default until
    the AUROC difference is measured (docs/performance.md, "bf16 feature extraction")."""
    choice = str(cfg.get("evaluation", {}).get("precision", "fp32")).lower()
    if choice not in EVAL_PRECISIONS:
        raise ConfigError(f"evaluation.precision={choice!r}: choose {' or '.join(EVAL_PRECISIONS)}")
    model.eval_autocast = EVAL_PRECISIONS[choice]
    if model.eval_autocast is not None:
        slow = device.type == "cpu" and not fast_bf16()
        (log.warning if slow else log.info)(
            "evaluation passes in %s autocast on %s%s", choice, device,
            " (a CPU without AMX: bf16 is emulated and slower than float32 here)" if slow else "")
    return model.eval_autocast


def _channels_last_input(module: torch.nn.Module, args: tuple):
    x = args[0]
    if isinstance(x, torch.Tensor) and x.ndim == 4:
        return (x.contiguous(memory_format=torch.channels_last), *args[1:])
    return None


def set_nan_check_every(model, cfg: DictConfig, device: torch.device) -> int:
    """``nan_check_every: auto|k``: how often the loss is read on the host for the non-finite
    check (``methods/nonfinite.py``); ``auto`` = every step on the CPU (free there), every
    ``NAN_CHECK_EVERY_CUDA`` steps on CUDA (each read makes the host wait for the GPU)."""
    every = cfg.get("nan_check_every", "auto")
    if str(every).lower() == "auto":
        every = NAN_CHECK_EVERY_CUDA if device.type == "cuda" else 1
    model.nan_check_every = int(every)
    if model.nan_check_every > 1:
        log.info("the loss is read on the host every %d training steps (nan_check_every)", model.nan_check_every)
    return model.nan_check_every


def share_rank_zero_state(model: torch.nn.Module) -> None:
    """Give every rank rank 0's weights and buffers (what rank 0 saved as the checkpoint).

    After DDP training the parameters agree, but buffers need not: each rank's last forward
    updated its BatchNorm running statistics with its own batch after DDP's buffer broadcast.
    Distributed evaluation would otherwise score each block with a slightly different model.
    """
    dist = torch.distributed
    state = [{k: v.detach().cpu() for k, v in model.state_dict().items()} if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(state, src=0)
    if dist.get_rank() != 0:
        model.load_state_dict(state[0])
