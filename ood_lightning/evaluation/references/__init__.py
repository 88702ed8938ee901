"""The published numbers of the papers this framework implements, as data.

One YAML per paper (``<paper>.yaml`` next to this module) holds the rows of its main tables,
transcribed from the text in ``shared/papers/``. A row says which method (our scorer name
where we have one, the paper's label beside it), on which backbone, ID set, OOD set and
metric, scored what (a fraction in [0, 1], ± std where printed). ``offline: false`` marks a
row whose setting the offline data cannot reproduce (the OOD or ID set is not in the packs);
``ood_exact`` / ``metric_exact: false`` mark a row whose set or metric the paper leaves
ambiguous, so a comparison says "≈" rather than "✓". Loading validates every row, so a
typo fails with the file, table and row named instead of silently matching nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

import yaml

from ood_lightning.core.errors import ConfigError

#: per (detector, OOD set) metrics a run writes (``ood_metrics`` keys plus open-set macro-F1)
OOD_METRICS = ("auroc", "aupr_in", "aupr_out", "fpr95", "tnr95", "detection_error", "autc", "macro_f1")
#: the VAE's latent SVM probe (``metrics.json`` ``generative.latent_probe.<ood>``), the thesis' Table 3.1
PROBE_METRICS = {"probe_positive_accuracy": "positive_accuracy", "probe_negative_accuracy": "negative_accuracy"}
METRICS = (*OOD_METRICS, "accuracy", *PROBE_METRICS)
LOWER_IS_BETTER = frozenset({"fpr95", "detection_error", "autc"})
#: the OOD set names this project's configs define (conf/ood/*.yaml and the experiment presets)
OOD_SETS = frozenset({"tin_crop", "tin_resize", "mnist", "gaussian", "uniform", "rademacher", "blobs", "heldout",
                      "diagonal", "mnist_noise", "noise", "cifar100", "svhn", "textures", "lsun", "isun", "places365"})
#: configured sets with no offline pack in shared/data: their rows must say ``offline: false``
NOT_OFFLINE = frozenset({"cifar100", "svhn", "textures", "lsun", "isun", "places365"})
FLOWS = frozenset({"glow", "realnvp", "maf", "residual"})

_REQUIRED = ("method", "method_label", "id", "ood", "ood_label", "metric", "value")
_OPTIONAL = ("backbone", "backbone_label", "std", "offline", "ood_exact", "metric_label", "metric_exact", "flow",
             "fit_augmented", "input_perturbation", "note")


@dataclass(frozen=True)
class ReferenceRow:
    """One published number. ``backbone`` is None where the paper does not name one."""

    paper: str
    table: str
    method: str  # our scorer name where one exists (msp, lde, ...), else the paper's, lower-cased
    method_label: str  # as printed
    backbone: str | None  # e.g. "ResNet-18", "WRN-28-10"
    backbone_label: str | None  # as printed in the table
    id: str  # ID set, our data name (cifar10, mnist, ...)
    ood: str  # our OOD set name, or the paper's where we have none
    ood_label: str  # as printed
    metric: str  # one of METRICS
    value: float  # fraction in [0, 1]
    std: float | None = None
    offline: bool = True  # False: the offline data cannot reproduce this setting
    ood_exact: bool = True  # False: the paper's set only roughly matches ``ood``
    metric_label: str | None = None  # as printed, where it differs from ``metric``
    metric_exact: bool = True  # False: the paper's metric only roughly matches ``metric``
    flow: str | None = None  # the density model, where the method takes one (LDE)
    #: the paper fits on latents of augmented training images (True) or plain ones (False); None: not stated
    fit_augmented: bool | None = None
    #: the paper perturbs the inputs (ε chosen without OOD data, e.g. ODIN*), or not; None: not stated
    input_perturbation: bool | None = None
    note: str | None = None

    @property
    def where(self) -> str:
        return f"{self.paper} Table {self.table}"


def papers() -> list[str]:
    """Names of the reference files shipped with the package (``paper=<name>``)."""
    return sorted(p.name[:-5] for p in resources.files(__package__).iterdir() if p.name.endswith(".yaml"))


def _row(file: str, table: str, index: int, raw: dict, defaults: dict, paper: str) -> ReferenceRow:
    where = f"{file}, table {table}, row {index + 1}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of {', '.join(_REQUIRED)}, got {raw!r}")
    fields = {**defaults, **raw}
    unknown = sorted(set(fields) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; a row has {', '.join(_REQUIRED + _OPTIONAL)}")
    missing = [k for k in _REQUIRED if fields.get(k) is None]
    if missing:
        raise ConfigError(f"{where}: missing {', '.join(missing)}")
    label = f"{where} ({fields['method']} / {fields['ood']} / {fields['metric']})"
    if fields["metric"] not in METRICS:
        raise ConfigError(f"{label}: unknown metric {fields['metric']!r}; use one of {', '.join(METRICS)}")
    offline = fields.get("offline", True) is not False
    if offline and fields["ood"] not in OOD_SETS:
        raise ConfigError(f"{label}: unknown OOD set {fields['ood']!r}; use one of {', '.join(sorted(OOD_SETS))}, "
                          "or mark the row offline: false if we lack the set")
    if offline and fields["ood"] in NOT_OFFLINE:
        raise ConfigError(f"{label}: {fields['ood']!r} has no offline pack; mark the row offline: false")
    if fields.get("flow") is not None and fields["flow"] not in FLOWS:
        raise ConfigError(f"{label}: unknown flow {fields['flow']!r}; use one of {', '.join(sorted(FLOWS))}")
    for key in ("fit_augmented", "input_perturbation"):
        if fields.get(key) is not None and not isinstance(fields[key], bool):
            raise ConfigError(f"{label}: {key} must be true, false or absent, got {fields[key]!r}")
    for key in ("value", "std"):
        v = fields.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0):
            raise ConfigError(f"{label}: {key} {v!r} is not a fraction in [0, 1] (divide a x100 number by 100)")
    return ReferenceRow(
        paper=paper, table=str(table), method=str(fields["method"]), method_label=str(fields["method_label"]),
        backbone=fields.get("backbone"), backbone_label=fields.get("backbone_label"), id=str(fields["id"]),
        ood=str(fields["ood"]), ood_label=str(fields["ood_label"]), metric=fields["metric"],
        value=float(fields["value"]), std=None if fields.get("std") is None else float(fields["std"]),
        offline=offline, ood_exact=fields.get("ood_exact", True) is not False, metric_label=fields.get("metric_label"),
        metric_exact=fields.get("metric_exact", True) is not False, flow=fields.get("flow"),
        fit_augmented=fields.get("fit_augmented"), input_perturbation=fields.get("input_perturbation"),
        note=fields.get("note"))


def parse(text: str, file: str) -> list[ReferenceRow]:
    """Rows of one reference file's text (``file`` names it in errors)."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{file} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("paper"), str) or not isinstance(doc.get("tables"), list):
        raise ConfigError(f"{file}: expected top-level keys paper (a name) and tables (a list)")
    rows = []
    for block in doc["tables"]:
        if not isinstance(block, dict) or "table" not in block or not isinstance(block.get("rows"), list):
            raise ConfigError(f"{file}: every entry of tables needs table (its number) and rows (a list)")
        defaults = block.get("defaults") or {}
        rows += [_row(file, str(block["table"]), i, raw, defaults, doc["paper"]) for i, raw in enumerate(block["rows"])]
    return rows


def load(paper: str) -> list[ReferenceRow]:
    """The rows of one paper (``dhm``, ``lde``, ``lsgm``, ``vmdls``, ``thesis``) or of ``all``."""
    if paper == "all":
        return [row for name in papers() for row in load(name)]
    if paper not in papers():
        raise ConfigError(f"no reference tables for paper={paper!r}; use one of {', '.join(papers())} or all")
    file = f"{paper}.yaml"
    return parse(resources.files(__package__).joinpath(file).read_text(), f"ood_lightning/evaluation/references/{file}")
