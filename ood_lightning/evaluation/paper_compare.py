"""Ours beside the paper's: every published row our run has, with Δ and how far the settings agree.

``python evaluate.py run_dir=<run or multirun> paper=<name|all>`` writes ``paper_compare.md``:
one line per reference row (:mod:`ood_lightning.evaluation.references`) whose (detector, OOD set, metric)
the run scored, ``ours | paper | Δ | setting match``, where the match says which of OOD set,
ID data (the set and its encoding: lossless or the JPEG copy), backbone, metric, the flow (LDE),
the fit split (augmented or not, how many inputs) and the input pre-processing (ε chosen or
none) agree, since a number is only comparable as far as its setting is. Rows of another ID set
are left out (counted), a cut-down run (limits, a debug preset, a lossy ID copy) is flagged
above its table, and a gap of :data:`LARGE_GAP` points or more is marked. A multirun is compared
per setting (its seeds averaged), and the paper's rows no run has are listed at the end.
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
#: |Δ| (points, ×100) from which a row is marked as a large gap
LARGE_GAP = 5.0

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
    id_sets: set = field(default_factory=set)  # the ID set the images are of (cifar10 for cifar10_jpeg)
    encodings: set = field(default_factory=set)  # "lossless", "JPEG copy (quality 75)"; empty: not recorded
    fits: dict = field(default_factory=lambda: defaultdict(set))  # detector -> {(augmented, samples, train size)}
    perturbations: dict = field(default_factory=lambda: defaultdict(set))  # detector -> {description or "none"}
    cut_downs: set = field(default_factory=set)  # why the run is not the full setting

    def one(self, names: set) -> str | None:
        return " / ".join(sorted(str(n) for n in names)) if names else None


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
        absorb_setting(s, m, data)
        for det in (m.get("results") or {}):
            if (name := _flow(conf, det)) is not None and det not in s.flows:
                s.flows[det].add(name)
        absorb_values(s, m, m.get("method") or choices.get("method"))
    return list(by_group.values())


def absorb_values(s: Setting, m: dict, method: str | None) -> None:
    """Add one run's numbers (every OOD metric, the latent probe, the accuracy under ``method``) to ``s``."""
    for det, rows in (m.get("results") or {}).items():
        for ood, metrics in rows.items():
            for k in OOD_METRICS:
                if isinstance(metrics.get(k), (int, float)):
                    s.values[(det, ood, k)].append(float(metrics[k]))
    for ood, probe in ((m.get("generative") or {}).get("latent_probe") or {}).items():
        for key, ours in PROBE_METRICS.items():
            if method and isinstance(probe.get(ours), (int, float)):
                s.values[(str(method), ood, key)].append(float(probe[ours]))
    if method and isinstance(m.get("accuracy"), (int, float)):
        s.values[(str(method), "-", "accuracy")].append(float(m["accuracy"]))


def setting_of(m: dict) -> Setting:
    """One run's :class:`Setting` from its ``metrics.json`` alone (the results page's paper view)."""
    s = Setting("-", runs=1)
    if m.get("backbone"):
        s.backbones.add(str(m["backbone"]))
    if m.get("data"):
        s.data.add(str(m["data"]))
    absorb_setting(s, m)
    absorb_values(s, m, m.get("method"))
    return s


def absorb_setting(s: Setting, m: dict, data_name: str | None = None) -> None:
    """Add what one run's ``metrics.json`` ``setting`` records (ID data, fit splits, pre-processing,
    cut-downs) to ``s``; of a run written before it was recorded, only the ID set (``data_name``)."""
    from ood_lightning.data.registry import dataset_identity

    setting = m.get("setting") or {}
    data = setting.get("id_data") or {}
    name = data.get("name") or m.get("data") or data_name
    if name:
        id_set = data.get("set") or dataset_identity(str(name))[0]
        if data.get("known_classes") is not None:
            id_set = f"{id_set} (classes {', '.join(map(str, data['known_classes']))})"
        s.id_sets.add(id_set)
    if data.get("encoding"):
        s.encodings.add(data["encoding"])
        if data["encoding"] != "lossless":
            s.cut_downs.add(f"ID data is the {data['encoding']} of {data.get('set')}")
    train_size = (setting.get("splits") or {}).get("train")
    for det, info in (setting.get("scorers") or {}).items():
        fit = info.get("fit")
        if fit is not None:
            s.fits[det].add((bool(fit.get("augmented")), fit.get("samples"), train_size))
        if "input_perturbation" in info:
            s.perturbations[det].add(_perturbation_text(info["input_perturbation"]))
        if info.get("flow") is not None:
            s.flows[det].add(str(info["flow"]))
    for key, value in (setting.get("limits") or {}).items():
        if key != "evaluation.fit_limit" or (train_size is not None and value < train_size):
            s.cut_downs.add(f"{key}={value}")
    if setting.get("debug"):
        s.cut_downs.add(f"debug={setting['debug']} (a smoke run, not a result)")


def _perturbation_text(p: dict | None) -> str:
    if not p:
        return "none"
    return f"ε {p['epsilon']:g} " + ("chosen on ID validation" if p.get("chosen") == "on ID validation" else "fixed")


def _fit_text(fit: tuple) -> str:
    augmented, samples, train = fit
    size = "?" if samples is None else f"{samples:,}" + (f" of {train:,}" if train and samples < train else "")
    return f"{'augmented' if augmented else 'plain'} {size}"


def id_set_differs(row: ReferenceRow, s: Setting) -> bool:
    """The run's ID set is known and is not the row's (encoding aside): the row is left out."""
    return bool(s.id_sets) and s.one(s.id_sets) != row.id


def setting_match(row: ReferenceRow, s: Setting) -> str:
    """E.g. "OOD ✓, ID ✓ lossless, backbone ✗ ResNet-56 vs ResNet-18, metric ✓, fit ✓ augmented 45,000"."""
    parts = ["OOD ✓" if row.ood_exact else f"OOD ≈ {row.ood} (paper: {row.ood_label})"]
    data = s.one(s.id_sets) or s.one(s.data)
    encoding = s.one(s.encodings)
    if data is None:
        parts.append("ID ?")
    elif data != row.id:
        parts.append(f"ID ✗ {data} vs {row.id}")
    elif encoding is None:
        parts.append("ID ✓")
    else:
        parts.append("ID ✓ lossless" if encoding == "lossless" else f"ID ✗ {encoding} vs the published images")
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
    fits = s.fits.get(row.method, set())
    if row.fit_augmented is not None or any(f[1] is not None and f[2] and f[1] < f[2] for f in fits):
        if not fits:
            parts.append("fit ? (not recorded)")
        else:
            ok = all(row.fit_augmented in (None, f[0]) and not (f[1] and f[2] and f[1] < f[2]) for f in fits)
            paper = "" if ok or row.fit_augmented is None else \
                f" vs {'augmented' if row.fit_augmented else 'plain'} full split"
            parts.append(f"fit {'✓' if ok else '✗'} {' / '.join(sorted(_fit_text(f) for f in fits))}{paper}")
    ours = s.perturbations.get(row.method, set())
    if row.input_perturbation is not None:
        if not ours:
            parts.append("pre-processing ? (not recorded)")
        else:
            text = s.one(ours)
            ok = all((p != "none") == row.input_perturbation for p in ours) and \
                all("chosen" in p for p in ours if p != "none")
            paper = "ε chosen on ID validation" if row.input_perturbation else "none"
            parts.append(f"pre-processing ✓ {text}" if ok else f"pre-processing ✗ {text} vs {paper}")
    elif ours and ours != {"none"}:
        parts.append(f"pre-processing {s.one(ours)} (paper: not stated)")
    return ", ".join(parts)


def _pct(value: float, std: float | None = None) -> str:
    return f"{100 * value:.2f}" + (f" ± {100 * std:.2f}" if std is not None else "")


def _value_key(row: ReferenceRow) -> tuple[str, str, str]:
    return (row.method, "-" if row.metric == "accuracy" else row.ood, row.metric)


#: what the columns of a comparison mean (printed above it)
LEGEND = ("Values ×100; Δ = ours − paper, in points (↓: lower is better); **bold ⚠**: |Δ| ≥ "
          f"{LARGE_GAP:g} points. Ours: the mean (± std) over a setting's seeds.")


def compare_text(run_dir: str | Path, paper: str) -> str:
    """The markdown of ``paper_compare.md`` for ``paper`` (a name or ``all``)."""
    rows = load(paper)
    groups = settings(run_dir)
    text = (f"# Ours vs the paper{'s' if paper == 'all' else ''}: {paper}\n\n{LEGEND}\n")
    ran: set[int] = set()
    for s in groups:
        name, label = s.one(s.backbones), s.one({backbone_label(b) for b in s.backbones})
        backbone = "?" if name is None else label if label == name else f"{label} ({name})"
        title = "Run" if s.group == "-" else f"Setting {s.group}"
        text += (f"\n## {title} ({s.runs} run{'s' if s.runs > 1 else ''}; backbone {backbone}, "
                 f"ID {s.one(s.data) or '?'})\n\n")
        text += section(rows, s, ran)
    missing = [row for i, row in enumerate(rows) if i not in ran]
    if missing:
        text += f"\n## Not run ({len(missing)} of {len(rows)} rows)\n\n"
        text += "".join(f"- {r.paper} T{r.table}: {r.method_label} · {r.ood} · {r.metric} = {_pct(r.value)}"
                        f"{' (not offline)' if not r.offline else ''}\n" for r in missing)
    return text


def section(rows: list[ReferenceRow], s: Setting, ran: set[int] | None = None) -> str:
    """One setting's comparison: its cut-down flag, the table (large gaps marked) and how many rows
    were left out for another ID set. ``ran`` collects the indices of the rows shown."""
    head = ["paper", "table", "method (paper's)", "OOD set", "metric", "ours", "paper", "Δ", "setting match"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    other_id: set[str] = set()
    for i, row in enumerate(rows):
        values = s.values.get(_value_key(row))
        if not values:
            continue
        if id_set_differs(row, s):
            other_id.add(row.id)
            continue
        if ran is not None:
            ran.add(i)
        mean, std = mean_std(values)
        ours = _pct(mean, std if len(values) > 1 else None) + (f" (n={len(values)})" if len(values) > 1 else "")
        arrow = " ↓" if row.metric in LOWER_IS_BETTER else ""
        delta = 100 * (mean - row.value)
        gap = f"**{delta:+.2f}** ⚠" if abs(delta) >= LARGE_GAP else f"{delta:+.2f}"
        lines.append("| " + " | ".join([
            row.paper, row.table, f"{row.method} ({row.method_label})", row.ood, row.metric + arrow, ours,
            _pct(row.value, row.std), gap, setting_match(row, s)]) + " |")
    out = ""
    if s.cut_downs:
        out += f"⚠ **Cut-down setting, not comparable as a result**: {'; '.join(sorted(s.cut_downs))}.\n\n"
    out += "\n".join(lines) + "\n" if len(lines) > 2 else "None of the paper's rows is in this run.\n"
    if other_id:
        out += (f"\nLeft out: the paper's rows on ID {', '.join(sorted(other_id))} (this run's ID set is "
                f"{s.one(s.id_sets)}).\n")
    return out


def write_paper_compare(run_dir: str | Path, paper: str) -> tuple[Path, str]:
    """Write ``paper_compare.md`` into ``run_dir``; returns its path and the text to print (the
    comparison, with the "not run" list, hundreds of lines for paper=all, cut to its count)."""
    text = compare_text(run_dir, str(paper))
    path = atomic_write_text(Path(run_dir) / OUTPUT, text)
    shown, _, rest = text.partition("\n## Not run")
    if rest:
        shown += f"\n## Not run{rest.splitlines()[0]}: listed in {path}\n"
    return path, shown
