"""The scoring contract: what every OOD score — a post-hoc detector or a method's own — declares.

One evaluation loop (:mod:`ood_lightning.scoring.loop`) runs every :class:`Scorer` the same
way: ``fit`` once on :class:`FitData`, then ``score`` each split's :class:`Outputs` of the one
shared forward pass, or ``score_batch`` over the inputs when the scorer declares
``per_batch``. Every score is *higher = more in-distribution*. Capabilities are class
attributes here, never probed with ``hasattr``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from ood_lightning.core.errors import ConfigError


class FeatureModel(Protocol):
    """What scorers may call on a model (every method in ``ood_lightning.methods`` has it)."""

    def forward_features(self, x: Tensor) -> dict[str, Tensor]:
        """Named intermediate outputs, in network order, ``"penultimate"`` ([B, D]) last."""

    def classify(self, features: Tensor) -> Tensor:
        """Classifier head: penultimate features [B, D] -> logits [B, C]."""

    @property
    def head(self) -> torch.nn.Module | None:
        """The classifier head module (``classify`` is this linear map where ``has_linear_head``)."""

    def __call__(self, x: Tensor) -> Tensor:
        """Logits [B, C]."""


def pool(t: Tensor) -> Tensor:
    """Average-pool a feature map [B, C, H, W] (or any [B, C, ...]) to [B, C]."""
    return t.flatten(2).mean(-1) if t.ndim > 2 else t


@dataclass
class Outputs:
    """Everything a scorer may read about a set of inputs, from one forward pass.

    ``layers`` holds the backbone's named outputs average-pooled to [N, D_l] (network order,
    ``"penultimate"`` last). ``extra`` holds per-input values the method computes in the same
    pass (:meth:`ood_lightning.methods.base.OODMethod.pass_values`, e.g. a VAE's IWAE bound).
    """

    logits: Tensor
    features: Tensor
    layers: dict[str, Tensor] = field(default_factory=dict)
    labels: Tensor | None = None
    extra: dict[str, Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.logits.shape[0]

    def subset(self, index: Tensor) -> Outputs:
        return Outputs(self.logits[index], self.features[index], {k: v[index] for k, v in self.layers.items()},
                       None if self.labels is None else self.labels[index], {k: v[index] for k, v in self.extra.items()})

    @classmethod
    def cat(cls, parts: list[Outputs]) -> Outputs:
        """Concatenate in order (e.g. the blocks of several ranks)."""
        if len(parts) == 1:
            return parts[0]
        labels = None if parts[0].labels is None else torch.cat([p.labels for p in parts])
        return cls(logits=torch.cat([p.logits for p in parts]), features=torch.cat([p.features for p in parts]),
                   layers={k: torch.cat([p.layers[k] for p in parts]) for k in parts[0].layers}, labels=labels,
                   extra={k: torch.cat([p.extra[k] for p in parts]) for k in parts[0].extra})


@dataclass
class FitData:
    """What a scorer may fit on. Never OOD data, except ``ood_tune`` for ``tunes_on_ood`` scorers.

    - ``train``: outputs of the ID training split (``evaluation.fit_limit`` of them), or None
      when no scorer of the run declares ``needs_fit``;
    - ``val_inputs``: preprocessed ID validation inputs on the model's device (hyperparameter
      selection without OOD data, e.g. Generalized ODIN's ε);
    - ``val``: ID validation outputs; ``ood_tune``: the tuning part of one OOD set (only for
      ``tunes_on_ood`` scorers, once per OOD set; metrics then use the rest of that set).
    """

    train: Outputs | None = None
    val_inputs: Tensor | None = None
    val: Outputs | None = None
    ood_tune: Outputs | None = None


#: one value of a fitted state (:meth:`Scorer.fit_state`): a tensor, or a plain JSON value
#: (number, string, bool, None, or lists / string-keyed dicts of those)
StateValue = Tensor | int | float | str | bool | None | list | dict


class Scorer:
    """Base class of every OOD score (higher = more in-distribution).

    Subclasses override :meth:`score` (from cached outputs) or, with ``per_batch``,
    :meth:`score_batch` (from the inputs), and :meth:`fit` when they estimate anything.
    """

    #: fit needs ``FitData.train`` (the evaluation then makes one pass over ID training data)
    needs_fit: bool = True
    #: scores need the inputs (e.g. input perturbation): one own pass per split via score_batch
    per_batch: bool = False
    #: fit reads OOD data (``FitData.ood_tune``): fitted and scored once per OOD set, named so in reports
    tunes_on_ood: bool = False
    #: reads a classifier's logits or features; skipped for models without a classifier (a VAE)
    needs_classifier: bool = True
    #: reads the weights of ``model.head`` (an nn.Linear with ``classify == head`` on the penultimate
    #: features: ViM, DICE, fDBD, GradNorm); skipped for methods that declare
    #: ``OODMethod.has_linear_head = False`` (G-ODIN, VMDLS)
    needs_linear_head: bool = False
    #: the fit's result can be saved and restored (:meth:`fit_state` / :meth:`load_fit_state`), so a
    #: rerun on the same fit data, config and code is served from the fit cache
    #: (:mod:`ood_lightning.scoring.fit_cache`, ``evaluation.fit_cache``). Declared by the scorers whose
    #: fit costs time (LSGM's mixtures, a latent flow, an ε search); trivial fits stay uncached.
    #: ``tunes_on_ood`` scorers are never cached (they are refitted per OOD set).
    fit_cacheable: bool = False
    #: the ID training inputs this scorer fits on: ``True`` with the backbone's training augmentation
    #: (one draw per image, LDE §6.2), ``False`` plain, ``None`` the run's ``evaluation.fit_augmented``.
    #: Scorers of one run may differ: each distinct split is extracted once (and feature-cached)
    fit_augmented: bool | None = None

    def fit_state(self) -> dict[str, StateValue]:
        """The fitted state as a flat dict: tensors, plus plain JSON values (``fit_cacheable`` scorers)."""
        raise NotImplementedError(f"{type(self).__name__} declares no cacheable fit (fit_cacheable = False)")

    def load_fit_state(self, state: dict[str, StateValue]) -> None:
        """Become the fitted scorer :meth:`fit_state` described; raise (KeyError, ValueError, ...) on a
        state that does not fit, never half-restore silently (the cache then refits)."""
        raise NotImplementedError(f"{type(self).__name__} declares no cacheable fit (fit_cacheable = False)")

    def fit(self, model: FeatureModel, data: FitData) -> Scorer:
        """Estimate whatever the score needs (default: nothing)."""
        return self

    def score(self, model: FeatureModel, outputs: Outputs) -> Tensor:
        """Scores [N] from cached outputs."""
        raise NotImplementedError(f"{type(self).__name__} scores inputs (per_batch), not cached outputs")

    def score_batch(self, model: FeatureModel, x: Tensor) -> Tensor:
        """Scores [B] of a batch of preprocessed inputs (``per_batch`` scorers override this)."""
        with torch.no_grad():
            feats = model.forward_features(x)
            out = Outputs(logits=model.classify(feats["penultimate"]), features=feats["penultimate"],
                          layers={k: pool(v) for k, v in feats.items()})
        return self.score(model, out)

    def predict(self, model: FeatureModel, outputs: Outputs) -> Tensor | None:
        """This score's own class prediction [N] for the open-set macro-F1; None = the classifier's argmax."""
        return None

    def setting(self) -> dict[str, object]:
        """What a reader needs to put this score beside a paper's (after :meth:`fit`): e.g. the input
        perturbation (ε and how it was chosen) or the density model; written to ``metrics.json`` and
        compared by the paper view (default: nothing to state)."""
        return {}

    def selected(self) -> dict[str, object]:
        """Hyperparameters :meth:`fit` chose (e.g. an ε searched on ID validation), logged and written to
        ``metrics.json`` so a reader of the table sees which value won (default: none)."""
        return {}


class Key(NamedTuple):
    """One entry of a result table: ``scorer``'s values on ``split``; ``tuned_for`` names the OOD
    set a ``tunes_on_ood`` scorer was fitted for (None otherwise)."""

    scorer: str
    split: str
    tuned_for: str | None = None

    def label(self) -> str:
        """``scorer/split`` (``scorer/split@tuned_for``): the name in ``scores.npz``."""
        return f"{self.scorer}/{self.split}" + (f"@{self.tuned_for}" if self.tuned_for else "")


ID_SPLITS = ("id_val", "id_test")


def layer_selection(layers: str | Sequence[str], key: str) -> str | tuple[str, ...]:
    """A multi-layer scorer's ``layers`` argument: ``"all"`` (every layer of the outputs), one name,
    or a non-empty list of names; ``key`` names the config key in the error."""
    if isinstance(layers, str):
        return "all" if layers == "all" else (layers,)
    names = tuple(str(n) for n in layers)
    if not names:
        raise ConfigError(f"{key}: at least one layer name (or all)")
    return names


@dataclass
class Results:
    """Scores and class predictions per :class:`Key`, and the ID facts the metrics need."""

    scores: dict[Key, Tensor]
    #: every key's class predictions (a scorer's own, else the classifier's argmax)
    predictions: dict[Key, Tensor]
    id_test_labels: Tensor
    #: the classifier's argmax on ID test (the reported accuracy)
    id_test_predictions: Tensor
    num_classes: int
    has_classifier: bool = True
    #: every split's outputs of the one forward pass (for a method's report, e.g. a VAE's)
    outputs: dict[str, Outputs] = field(default_factory=dict, repr=False)
    #: wall seconds per stage: ``features/<split>``, ``fit/<scorer>``, ``score/<scorer>``
    timings: dict[str, float] = field(default_factory=dict)
    #: how many ID training inputs the scorers were fitted on (None: nothing needed a fit)
    fit_samples: int | None = None
    #: whether the run's fit split (``evaluation.fit_augmented``) was augmented
    fit_augmented: bool = False
    #: per fitted scorer (``needs_fit``): whether the inputs it fitted on were augmented (its own
    #: :attr:`Scorer.fit_augmented`, else the run's)
    fit_splits: dict[str, bool] = field(default_factory=dict)
    #: per scorer, its scores on the ID fit (training) set, when asked for (``score_all(train_scores=True)``):
    #: the open-set F1 threshold of ``evaluation.f1_threshold: id_train``. Not an ID split of the table.
    train_scores: dict[str, Tensor] = field(default_factory=dict, repr=False)
    #: per scorer, what a reader needs to compare it with a paper (:meth:`Scorer.setting`, after the fit)
    settings: dict[str, dict[str, object]] = field(default_factory=dict)
    #: per scorer, what its fit chose (:meth:`Scorer.selected`); scorers that chose nothing are absent
    selected: dict[str, dict[str, object]] = field(default_factory=dict)
    #: per fitted scorer (``needs_fit``), with a fit cache: ``"cache"`` (served), ``"fitted"`` (missed, fitted
    #: and stored) or ``"not cacheable"`` (fitted; not ``fit_cacheable``, or ``tunes_on_ood``)
    fit_cache: dict[str, str] = field(default_factory=dict)

    def scorers(self) -> list[str]:
        return list(dict.fromkeys(k.scorer for k in self.scores))

    def ood_keys(self) -> list[Key]:
        """The keys that hold an OOD set's scores, in insertion order."""
        return [k for k in self.scores if k.split not in ID_SPLITS]
