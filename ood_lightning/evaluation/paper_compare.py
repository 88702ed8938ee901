"""Ours beside the paper's: every published row our run has, with Δ and how far the settings agree.

``python evaluate.py run_dir=<run or multirun> paper=<name|all>`` writes ``paper_compare.md``:
one line per reference row (:mod:`ood_lightning.evaluation.references`) whose (detector, OOD set, metric)
the run scored, ``ours | paper | Δ | setting match``, where the match says which of OOD set,
ID set, backbone and metric (and the flow, for LDE) agree, since a number is only comparable
as far as its setting is. A multirun is compared per setting (its seeds averaged), and the
paper's rows no run has are listed at the end.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from ood_lightning.core.errors import ConfigError
from ood_lightning.core.io import atomic_write_text
from ood_lightning.evaluation.aggregate import collect
from ood_lightning.evaluation.metrics import mean_std
from ood_lightning.evaluation.references import LOWER_IS_BETTER, OOD_METRICS, PROBE_METRICS, ReferenceRow, load

OUTPUT = "paper_compare.md"

#: our backbone config names -> the label papers print
_BACKBONE_LABELS = {"resnet18": "ResNet-18", "resnet34": "ResNet-34", "resnet50_imagenet": "ResNet-50",
                    "swin_s_imagenet": "Swin-S", "wrn28_10": "WRN-28-10", "wrn28_2": "WRN-28-2",
                    "densenet100": "DenseNet-BC-100", "dcgan": "DCGAN", "dcganencoder": "DCGAN", "cnn": "SmallCNN",
                    "crosr_cnn": "CNN (Yoshihashi et al. 2019)",
                    "smallcnn": "SmallCNN", "mlp2d": "MLP-2D", "prewitt": "Prewitt"}


def backbone_label(name: str | None) -> str | None:
    """``cifar_resnet56_pretrained`` -> ``ResNet-56``, ``wrn28_10`` -> ``WRN-28-10``; unknown names unchanged."""
    if not name:
        return None
    key = name.lower().removesuffix("_pretrained")
    m = re.fullmatch(r"cifar_resnet(\d+)", key)
    return f"ResNet-{m.group(1)}" if m else _BACKBONE_LABELS.get(key, name)


def _canonical(label: str) -> str:
    return re.sub(r"[^a-z0-9]", "", label.lower()).replace("wideresnet", "wrn")


@dataclass
class Setting:
    """One group of runs (a multirun's setting over seeds): what it ran on and what it scored."""

    group: str
    runs: int = 0
    backbones: set = field(default_factory=set)
    data: set = field(default_factory=set)
    values: dict = field(default_factory=lambda: defaultdict(list))  # (detector, ood, metric) -> values
    flows: dict = field(default_factory=lambda: defaultdict(set))  # detector -> flow names

    def one(self, names: set) -> str | None:
        return " / ".join(sorted(names)) if names else None


def _run_config(run: Path) -> tuple[dict, dict]:
    """The run's resolved-as-far-as-possible config and Hydra's runtime choices ({} when absent)."""
    out = []
    for name in ("config.yaml", "hydra.yaml"):
        path = run / ".hydra" / name
        try:
            out.append(yaml.safe_load(path.read_text()) or {} if path.is_file() else {})
        except yaml.YAMLError:
            out.append({})
    cfg, hydra = out
    choices = ((hydra.get("hydra") or {}).get("runtime") or {}).get("choices") or {}
    return cfg, choices


def _select(cfg, key: str):
    try:
        value = OmegaConf.select(cfg, key)
    except Exception:  # an interpolation to a resolver this process lacks: treat as not recorded
        return None
    return value if isinstance(value, (str, int, float)) else None


def _backbone_from_config(cfg: dict, choices: dict) -> str | None:
    if choices.get("backbone"):
        return str(choices["backbone"])
    bb = cfg.get("backbone") or {}
    target = str(bb.get("_target_", "")).rsplit(".", 1)[-1]
    if target.lower() == "wideresnet" and bb.get("depth") and bb.get("width"):
        return f"wrn{bb['depth']}_{bb['width']}"
    return target or None


def _flow(conf, detector: str) -> str | None:
    for key in (f"detectors.{detector}.flow.name", f"method.scorers.{detector}.flow.name"):
        if (name := _select(conf, key)) is not None:
            return str(name)
    if _select(conf, f"method.variants.{detector}") is not None:  # method=lde's own scores
        return _select(conf, "method.flow.name")
    return None


def settings(run_dir: str | Path) -> list[Setting]:
    """Every finished run under ``run_dir``, grouped by its overrides without ``seed=``."""
    runs, _ = collect(run_dir)
    if not runs:
        raise ConfigError(f"no readable metrics.json under {run_dir}: did the runs finish?")
    by_group: dict[str, Setting] = {}
    for m in runs:
        s = by_group.setdefault(m["group"], Setting(m["group"]))
        s.runs += 1
        cfg, choices = _run_config(Path(m["run"]))
        conf = OmegaConf.create(cfg)
        backbone = m.get("backbone") or _backbone_from_config(cfg, choices)
        data = m.get("data") or _select(conf, "data.name")
        if backbone:
            s.backbones.add(str(backbone))
        if data:
            s.data.add(str(data))
        for det, rows in (m.get("results") or {}).items():
            if (name := _flow(conf, det)) is not None:
                s.flows[det].add(name)
            for ood, metrics in rows.items():
                for k in OOD_METRICS:
                    if isinstance(metrics.get(k), (int, float)):
                        s.values[(det, ood, k)].append(float(metrics[k]))
        method = m.get("method") or choices.get("method")
        for ood, probe in ((m.get("generative") or {}).get("latent_probe") or {}).items():
            for key, ours in PROBE_METRICS.items():
                if method and isinstance(probe.get(ours), (int, float)):
                    s.values[(str(method), ood, key)].append(float(probe[ours]))
        if method and isinstance(m.get("accuracy"), (int, float)):
            s.values[(str(method), "-", "accuracy")].append(float(m["accuracy"]))
    return list(by_group.values())


def setting_match(row: ReferenceRow, s: Setting) -> str:
    """E.g. "OOD ✓, ID ✓, backbone ✗ ResNet-56 vs ResNet-18, metric ✓"."""
    parts = ["OOD ✓" if row.ood_exact else f"OOD ≈ {row.ood} (paper: {row.ood_label})"]
    data = s.one(s.data)
    parts.append("ID ?" if data is None else "ID ✓" if data == row.id else f"ID ✗ {data} vs {row.id}")
    ours = s.one({backbone_label(b) for b in s.backbones})
    if row.backbone is None:
        parts.append("backbone ? (paper: not stated)")
    elif ours is None:
        parts.append("backbone ? (not recorded)")
    elif _canonical(ours) == _canonical(row.backbone):
        parts.append("backbone ✓")
    else:
        parts.append(f"backbone ✗ {ours} vs {row.backbone}")
    parts.append("metric ✓" if row.metric_exact else f"metric ≈ {row.metric} (paper: {row.metric_label or '?'})")
    if row.flow is not None:
        flow = s.one(s.flows.get(row.method, set()))
        parts.append("flow ? (not recorded)" if flow is None else "flow ✓" if flow == row.flow
                     else f"flow ✗ {flow} vs {row.flow}")
    return ", ".join(parts)


def _pct(value: float, std: float | None = None) -> str:
    return f"{100 * value:.2f}" + (f" ± {100 * std:.2f}" if std is not None else "")


def _value_key(row: ReferenceRow) -> tuple[str, str, str]:
    return (row.method, "-" if row.metric == "accuracy" else row.ood, row.metric)


def compare_text(run_dir: str | Path, paper: str) -> str:
    """The markdown of ``paper_compare.md`` for ``paper`` (a name or ``all``)."""
    rows = load(paper)
    groups = settings(run_dir)
    text = (f"# Ours vs the paper{'s' if paper == 'all' else ''}: {paper}\n\nValues ×100; Δ = ours − paper, in points "
            f"(↓: lower is better). Ours: the mean (± std) over a setting's seeds.\n")
    ran: set[int] = set()
    for s in groups:
        head = ["paper", "table", "method (paper's)", "OOD set", "metric", "ours", "paper", "Δ", "setting match"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for i, row in enumerate(rows):
            values = s.values.get(_value_key(row))
            if not values:
                continue
            ran.add(i)
            mean, std = mean_std(values)
            ours = _pct(mean, std if len(values) > 1 else None) + (f" (n={len(values)})" if len(values) > 1 else "")
            arrow = " ↓" if row.metric in LOWER_IS_BETTER else ""
            lines.append("| " + " | ".join([
                row.paper, row.table, f"{row.method} ({row.method_label})", row.ood, row.metric + arrow, ours,
                _pct(row.value, row.std), f"{100 * (mean - row.value):+.2f}", setting_match(row, s)]) + " |")
        name, label = s.one(s.backbones), s.one({backbone_label(b) for b in s.backbones})
        backbone = "?" if name is None else label if label == name else f"{label} ({name})"
        title = "Run" if s.group == "-" else f"Setting {s.group}"
        text += (f"\n## {title} ({s.runs} run{'s' if s.runs > 1 else ''}; backbone {backbone}, "
                 f"ID {s.one(s.data) or '?'})\n\n")
        text += "\n".join(lines) + "\n" if len(lines) > 2 else "None of the paper's rows is in this run.\n"
    missing = [row for i, row in enumerate(rows) if i not in ran]
    if missing:
        text += f"\n## Not run ({len(missing)} of {len(rows)} rows)\n\n"
        text += "".join(f"- {r.paper} T{r.table}: {r.method_label} · {r.ood} · {r.metric} = {_pct(r.value)}"
                        f"{' (not offline)' if not r.offline else ''}\n" for r in missing)
    return text


def write_paper_compare(run_dir: str | Path, paper: str) -> tuple[Path, str]:
    """Write ``paper_compare.md`` into ``run_dir``; returns its path and the text to print (the
    comparison, with the "not run" list, hundreds of lines for paper=all, cut to its count)."""
    text = compare_text(run_dir, str(paper))
    path = atomic_write_text(Path(run_dir) / OUTPUT, text)
    shown, _, rest = text.partition("\n## Not run")
    if rest:
        shown += f"\n## Not run{rest.splitlines()[0]}: listed in {path}\n"
    return path, shown
