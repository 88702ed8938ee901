"""LDE's ablation tables on one frozen backbone, each from one command (Cook et al. 2024):
Fig. 3 (PCA dimensionality of the latents before the flow) and Tables 3 + 5 (flow type, each
on L2-normalised and on raw latents).

    python sweeps/lde_tables.py --table pca   [--pca 4,8,16,32,none] [hydra overrides ...]
    python sweeps/lde_tables.py --table flows [--flows glow,realnvp,residual,maf] [hydra overrides ...]

The backbone, data and OOD sets are a ``train.py`` config composed from :data:`DEFAULT_OVERRIDES`
plus the overrides given (a later ``key=`` replaces a default's), so any backbone preset or
``backbone.checkpoint=<run>/checkpoints/last.ckpt`` works. Every split is extracted once through
the framework's feature cache (a re-run reads it from disk); every configuration is fitted on
the same fit features: the paper's fit data, one epoch over the augmented latents of the whole
training split (``conf/method/lde.yaml``: ``fit_augmented: true, fit_limit: null``), with the
LDE preset's optimiser settings and the flow presets of ``conf/method/flow/``. Writes
``lde_<table>.md`` (ours, then the paper's rows from ``ood_lightning/evaluation/references/lde.yaml``),
``lde_<table>.json`` (the numbers) and, for the PCA sweep, ``lde_pca.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import torch
import yaml
from _common import ROOT, compose_train
from omegaconf import OmegaConf
from torch import Tensor

from ood_lightning.core import provenance
from ood_lightning.core.errors import ConfigError, OODLightningError
from ood_lightning.evaluation.metrics import auroc
from ood_lightning.evaluation.references import load as load_references
from ood_lightning.evaluation.style import ID_COLOUR, legend, reference, save, styled
from ood_lightning.methods.lde.latent_flow import LatentFlowDetector

matplotlib.use("Agg")  # no display: figures go to files

log = logging.getLogger("lde_tables")

#: the published ResNet-20 on CIFAR-10 against the post-hoc preset's OOD sets, fitted as the paper does
DEFAULT_OVERRIDES = ("experiment=posthoc_cifar10", "backbone=cifar_resnet20_pretrained",
                     "evaluation.fit_limit=null", "evaluation.fit_augmented=true")
DEFAULT_PCA = "4,8,16,32,none"
DEFAULT_FLOWS = "glow,realnvp,residual,maf"
FLOW_PRESETS = ROOT / "conf" / "method" / "flow"
LDE_PRESET = ROOT / "conf" / "method" / "lde.yaml"
#: the ID split every AUROC is taken against (as in every table of the framework)
ID_SET = "id_test"
TABLES = ("pca", "flows")


@dataclass
class Config:
    """One row of a table: which flow, on which latents."""

    name: str
    flow: str
    normalize: str
    pca_dim: int | None = None


@dataclass
class Row:
    name: str
    flow: str
    normalize: str
    pca_dim: int | None
    dim: int
    fit_samples: int
    fit_steps: int
    fit_s: float
    score_s: float
    auroc: dict[str, float] = field(default_factory=dict)
    mean_auroc: float = float("nan")
    bpd: dict[str, float] = field(default_factory=dict)


# -- options -------------------------------------------------------------------------------


def parse_pca(text: str) -> list[int | None]:
    """``"4,8,none"`` -> ``[4, 8, None]`` (``none``: the unreduced latents)."""
    out: list[int | None] = []
    for part in (p.strip() for p in text.split(",")):
        if part.lower() == "none":
            value = None
        elif part.isdigit() and int(part) > 0:
            value = int(part)
        else:
            raise ConfigError(f"--pca: {part!r} is not a positive number of components or none (e.g. --pca 4,8,none)")
        if value in out:
            raise ConfigError(f"--pca: {part} is listed twice")
        out.append(value)
    return out


def flow_presets() -> list[str]:
    return sorted(p.stem for p in FLOW_PRESETS.glob("*.yaml"))


def parse_flows(text: str) -> list[str]:
    """``"glow,realnvp"`` -> the names, each a preset of ``conf/method/flow/``."""
    names = [p.strip() for p in text.split(",") if p.strip()]
    known = flow_presets()
    for name in names:
        if name not in known:
            raise ConfigError(f"--flows: unknown flow {name!r}; use presets of conf/method/flow: {', '.join(known)}")
    if len(set(names)) != len(names) or not names:
        raise ConfigError(f"--flows: give each flow once, e.g. --flows {DEFAULT_FLOWS} (got {text!r})")
    return names


def configurations(table: str, pca: list[int | None] | None = None, flows: list[str] | None = None) -> list[Config]:
    """The rows of a table: Fig. 3 sweeps ``pca_dim`` of the paper's Glow on L2-normalised latents;
    Tables 3 + 5 cross every flow with ``normalize`` l2 and none."""
    if table == "pca":
        return [Config(f"pca={'none' if d is None else d}", "glow", "l2", d) for d in (pca or [])]
    if table == "flows":
        return [Config(f"{f}, {norm}", f, norm) for f in (flows or []) for norm in ("l2", "none")]
    raise ConfigError(f"--table must be one of {', '.join(TABLES)}, got {table!r}")


def flow_preset(name: str) -> dict:
    """A flow preset of ``conf/method/flow`` as builder arguments (its defaults list merged first)."""
    raw = OmegaConf.load(FLOW_PRESETS / f"{name}.yaml")
    merged = OmegaConf.create()
    for entry in raw.get("defaults", ["_self_"]):
        merged = OmegaConf.merge(merged, raw if entry == "_self_" else OmegaConf.create(flow_preset(str(entry))))
    spec = OmegaConf.to_container(merged, resolve=True)
    for key in ("defaults", "_target_", "_partial_"):
        spec.pop(key, None)
    return spec


def flow_args(pairs: list[str], flows: list[str]) -> dict[str, dict]:
    """``["actnorm=true"]`` -> each flow's preset with that key replaced (every flow must have the key)."""
    presets = {f: flow_preset(f) for f in flows}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--flow-arg: expected KEY=VALUE (e.g. --flow-arg actnorm=true), got {pair!r}")
        for name, spec in presets.items():
            if key not in spec or key == "name":
                raise ConfigError(f"--flow-arg: flow preset {name!r} has no argument {key!r}; it has "
                                  f"{', '.join(k for k in spec if k != 'name')}")
            spec[key] = yaml.safe_load(value)
    return presets


def lde_fit_settings(seed: int) -> dict:
    """The LDE preset's fit block (ε, lr, epochs, batch size) with the run's seed."""
    fit = OmegaConf.to_container(OmegaConf.load(LDE_PRESET).method.fit, resolve=False)
    fit.pop("pca_dim", None)
    fit["seed"] = int(seed)
    return fit


def merged_overrides(extra: list[str]) -> list[str]:
    """:data:`DEFAULT_OVERRIDES` with any key the user gives replaced by theirs."""
    keys = {o.split("=", 1)[0].lstrip("+~") for o in extra}
    return [o for o in DEFAULT_OVERRIDES if o.split("=", 1)[0] not in keys] + list(extra)


# -- fitting -------------------------------------------------------------------------------


def check_configs(configs: list[Config], dim: int) -> None:
    for c in configs:
        if c.pca_dim is not None and c.pca_dim > dim:
            raise ConfigError(f"--pca: {c.pca_dim} components asked for, but the features have dimension {dim}")


def run_table(configs: list[Config], train: Tensor, sets: dict[str, Tensor], fit: dict,
              presets: dict[str, dict] | None = None, device: str = "cpu", on_row=None) -> list[Row]:
    """Fit one :class:`LatentFlowDetector` per configuration on the same ``train`` features and
    score every set of ``sets`` (the first is ID: every other gets an AUROC against it).

    ``fit`` holds the detector's fit settings (ε, lr, epochs, batch_size, seed); ``presets`` maps a
    flow name to its builder arguments (default: :func:`flow_preset`); ``on_row(rows so far)`` runs
    after each row (the driver writes its outputs then, so a long table keeps what it finished)."""
    check_configs(configs, train.shape[1])
    id_name, *ood = sets
    rows = []
    for c in configs:
        spec = dict((presets or {}).get(c.flow) or flow_preset(c.flow))
        flow = spec.pop("name", c.flow)
        det = LatentFlowDetector(flow=flow, n_blocks=spec.pop("n_blocks", None), hidden=spec.pop("hidden", None),
                                 normalize=c.normalize, pca_dim=c.pca_dim, device=device, flow_kwargs=spec, **fit)
        start = time.perf_counter()
        det.fit_with_history(None, train)
        fit_s = time.perf_counter() - start
        start = time.perf_counter()
        bpd = {name: det.bpd(feats) for name, feats in sets.items()}
        score_s = time.perf_counter() - start
        aurocs = {name: auroc((-bpd[id_name]).double().numpy(), (-bpd[name]).double().numpy()) for name in ood}
        row = Row(c.name, flow, c.normalize, c.pca_dim, det.dim, det.fit_samples, det.fit_steps, round(fit_s, 2),
                  round(score_s, 2), aurocs, sum(aurocs.values()) / max(len(aurocs), 1),
                  {name: float(v.mean()) for name, v in bpd.items()})
        log.info("%s: mean AUROC %.4f, fit %.1f s (%d steps), scored in %.1f s", c.name, row.mean_auroc, fit_s,
                 det.fit_steps, score_s)
        rows.append(row)
        if on_row is not None:
            on_row(rows)
    return rows


def subsample(sets: dict[str, Tensor], limit: int | None, seed: int = 0) -> dict[str, Tensor]:
    """At most ``limit`` rows of each set, a seeded random subset (the same rows for every
    configuration): scoring is what a residual flow's exact log-det makes slow."""
    if limit is None:
        return sets
    g = torch.Generator().manual_seed(seed)
    return {k: v[torch.randperm(len(v), generator=g)[:limit]] if len(v) > limit else v for k, v in sets.items()}


# -- the paper's rows and the outputs ------------------------------------------------------------


def paper_rows(table: str) -> list[dict]:
    """The paper's numbers beside a table: Tables 3 and 5 for flows; Fig. 3 prints none."""
    if table != "flows":
        return []
    return [{"table": r.table, "method": r.method, "flow": r.flow, "normalize": "none" if r.method == "lde_unnormalized"
             else "l2", "ood": r.ood_label, "auroc": r.value, "label": r.method_label}
            for r in load_references("lde") if r.table in ("3", "5")]


#: what Fig. 3 shows, in the paper's words (§6.1): the text prints no numbers for it
FIG3 = ("Paper, Fig. 3 (ResNet-18, 512-d latents; the text prints no numbers, only the figure): \"generally an "
        "unreduced latent space yields stronger OOD detection performance ... for CIFAR-10, the performance "
        "generally increases but is lower for the unreduced embedding of size 512\" (§6.1).")


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.2f}"


def markdown(table: str, rows: list[Row], setting: dict, paper: list[dict]) -> str:
    """Ours (AUROC ×100 per OOD set, their mean, mean bpd per set), then the paper's rows."""
    ood = list(rows[0].auroc) if rows else []
    sets = list(rows[0].bpd) if rows else []
    title = {"pca": "Fig. 3: PCA dimensionality", "flows": "Tables 3 + 5: flow type × latent normalisation"}[table]
    prov = setting.get("provenance") or {}
    commit = prov.get("commit") or {}
    out = [f"# LDE {title}", ""]
    if prov:
        out += [f"Written by `{prov['command']}` at commit `{(commit.get('sha') or 'unknown')[:12]}"
                f"{' with uncommitted changes' if commit.get('dirty') else ''}` on "
                f"{provenance.describe_machine(prov.get('machine') or {})}; do not edit by hand.", ""]
    out += [f"Backbone {setting.get('backbone', '?')}, ID {setting.get('data', '?')}; flow fitted on "
           f"{setting['fit_samples']:,} {'augmented ' if setting.get('fit_augmented') else ''}training latents, "
           f"{setting['fit_steps']} steps ({setting['epochs']} epoch(s) of batch {setting['batch_size']}, "
           f"Adam lr {setting['lr']:g}, ε = 1/{round(1 / setting['epsilon'])}), feature dim {setting['feature_dim']}. "
           f"AUROC ×100, {ID_SET} (ID positive) vs each OOD set; bpd = mean bits per dimension. "
           + (f"Scored on a seeded random {setting['score_limit']:,} inputs per set. " if setting.get("score_limit")
              else "") + (f"Flow preset arguments replaced: {', '.join(setting['flow_args'])}. "
                          if setting.get("flow_args") else "") + f"Wall time {setting.get('wall_s', '?')} s (features {setting.get('features_s', '?')} s), "
           f"{setting.get('rows_done', f'{len(rows)}/{len(rows)}')} rows.", "",
           "| config | d | fit s | score s | " + " | ".join(f"AUROC {o}" for o in ood) + " | mean AUROC | "
           + " | ".join(f"bpd {s}" for s in sets) + " |",
           "|" + "---|" * (5 + len(ood) + len(sets))]
    for r in rows:
        out.append(f"| {r.name} | {r.dim} | {r.fit_s:.1f} | {r.score_s:.1f} | "
                   + " | ".join(_pct(r.auroc[o]) for o in ood) + f" | **{_pct(r.mean_auroc)}** | "
                   + " | ".join(f"{r.bpd[s]:.2f}" for s in sets) + " |")
    out.append("")
    if table == "pca":
        out.append(FIG3)
    elif paper:
        out += ["Paper (ResNet-18 on CIFAR-10, 10-block Glow unless named; SVHN and CIFAR-100 have no offline pack, "
                "so the OOD sets differ from ours; Table 5 does not state its normalisation, taken as the paper's "
                "default, normalised):", "",
                "| config | paper table | paper SVHN | paper CIFAR-100 | our mean AUROC |", "|---|---|---|---|---|"]
        ours = {(r.flow, r.normalize): r.mean_auroc for r in rows}
        keys = sorted({(p["table"], p["flow"], p["normalize"]) for p in paper}, key=lambda k: (k[0], k[1], k[2]))
        for tab, flow, norm in keys:
            vals = {p["ood"]: p["auroc"] for p in paper if (p["table"], p["flow"], p["normalize"]) == (tab, flow, norm)}
            out.append(f"| {flow}, {norm} | {tab} | {_pct(vals.get('SVHN'))} | {_pct(vals.get('CIFAR-100'))} | "
                       f"{_pct(ours.get((flow, norm)))} |")
    return "\n".join(out) + "\n"


@styled
def pca_figure(rows: list[Row], feature_dim: int, title: str, out: Path) -> Path:
    """AUROC per OOD set (and their mean) and mean bpd per set against the number of components."""
    # "none" sits at the feature dimension, or one octave right of it when pca=D (a centred
    # rotation, which differs from none through the centring before L2 normalisation) is a row too
    full = 2 * feature_dim if any(r.pca_dim == feature_dim for r in rows) else feature_dim
    rows = sorted(rows, key=lambda r: full if r.pca_dim is None else r.pca_dim)
    xs = [full if r.pca_dim is None else r.pca_dim for r in rows]
    fig, (ax_a, ax_b) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name in rows[0].auroc:
        ax_a.plot(xs, [r.auroc[name] for r in rows], marker="o", label=name)
    ax_a.plot(xs, [r.mean_auroc for r in rows], marker="s", color=ID_COLOUR, linewidth=2.5, label="mean")
    for name in rows[0].bpd:
        ax_b.plot(xs, [r.bpd[name] for r in rows], marker="o", label=name,
                  **({"color": ID_COLOUR, "linewidth": 2.5} if name == ID_SET else {}))
    labels = [f"none\n({r.dim})" if r.pca_dim is None else str(x) for x, r in zip(xs, rows)]
    for ax in (ax_a, ax_b):
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, labels)
        ax.minorticks_off()
        ax.set_xlabel(f"PCA components (of {feature_dim}; none = unreduced)")
        legend(ax)
    reference(ax_a, y=0.5)
    ax_a.set(ylabel="AUROC (ID positive; 0.5 = chance)", title=f"{title}: AUROC vs PCA dimension")
    ax_b.set(ylabel="bits per dimension", title="mean bpd per set")
    return save(fig, out)


def write_outputs(table: str, rows: list[Row], setting: dict, out_dir: Path) -> list[Path]:
    """``lde_<table>.md``, ``lde_<table>.json`` and (pca) ``lde_pca.png`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paper = paper_rows(table)
    md = out_dir / f"lde_{table}.md"
    md.write_text(markdown(table, rows, setting, paper))
    js = out_dir / f"lde_{table}.json"
    js.write_text(json.dumps({"table": table, "setting": setting, "rows": [asdict(r) for r in rows],
                              "paper": paper}, indent=2))
    paths = [md, js]
    if table == "pca" and rows:
        paths.append(pca_figure(rows, setting["feature_dim"], f"LDE (glow, l2), {setting.get('backbone', '')}",
                                out_dir / "lde_pca.png"))
    return paths


# -- the backbone's features ------------------------------------------------------------------


def load_features(overrides: list[str], run_dir: Path) -> tuple[Tensor, dict[str, Tensor], dict]:
    """(fit features, {ID_SET, OOD sets: features}, setting) of the composed config's backbone,
    each split read from the feature cache or extracted once into it (as ``train.py`` would)."""
    from ood_lightning.run.build import build_data, build_model, choices, connect, feature_cache
    from ood_lightning.run.runtime import resolve_device
    from ood_lightning.scoring.feature_cache import model_fingerprint
    from ood_lightning.scoring.loop import split_outputs

    cfg = compose_train(overrides, run_dir)
    picked = choices()
    dm = build_data(cfg)
    dm.setup("test")
    model = build_model(cfg, dm.num_classes)  # loads backbone.checkpoint: a run's .ckpt or published weights
    connect(dm, model)
    device = resolve_device(cfg.evaluation.device)
    model = model.to(device).eval()
    cache = feature_cache(cfg, model)
    if cache is None:
        log.warning("no feature cache (no backbone.checkpoint, or evaluation.feature_cache=false): every split is "
                    "extracted again on each run")
    fingerprint = model_fingerprint(model) if cache is not None else None
    preprocess = dm.preprocess.to(device)
    limit, augment = cfg.evaluation.fit_limit, bool(cfg.evaluation.get("fit_augmented", False))
    start = time.perf_counter()
    train = split_outputs(model, dm, "id_train", dm.fit_dataloader(limit), preprocess, device, cache, fingerprint,
                          limit=limit, augment=augment).features
    sets = {}
    loaders = dm.eval_dataloaders()
    for split in [ID_SET, *(s for s in loaders if s not in ("id_val", ID_SET))]:
        sets[split] = split_outputs(model, dm, split, loaders[split], preprocess, device, cache, fingerprint).features
    setting = {"backbone": picked.get("backbone"), "data": str(cfg.data.name), "overrides": overrides,
               "fit_augmented": augment, "fit_limit": limit, "feature_dim": int(train.shape[1]),
               "features_s": round(time.perf_counter() - start, 1), "device": str(device),
               "cache": None if cache is None else str(cache.root), "seed": int(cfg.seed)}
    return train.float(), {k: v.float() for k, v in sets.items()}, setting


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--table", required=True, choices=TABLES)
    ap.add_argument("--pca", default=DEFAULT_PCA, help=f"pca_dim grid, 'none' = unreduced (default {DEFAULT_PCA})")
    ap.add_argument("--flows", default=DEFAULT_FLOWS, help=f"flow presets of conf/method/flow (default {DEFAULT_FLOWS})")
    ap.add_argument("--flow-arg", action="append", default=[], metavar="KEY=VALUE",
                    help="replace one argument of every flow preset used (e.g. actnorm=true for residual)")
    ap.add_argument("--score-limit", type=int, default=None,
                    help="score a seeded random subset of at most this many inputs per set (default: all)")
    ap.add_argument("--out", type=Path, default=Path("outputs/lde_tables"))
    ap.add_argument("overrides", nargs="*", help="train.py overrides (backbone=..., ood=[...], seed=...)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    try:
        configs = configurations(args.table, parse_pca(args.pca) if args.table == "pca" else None,
                                 parse_flows(args.flows) if args.table == "flows" else None)
        if args.score_limit is not None and args.score_limit < 2:
            raise ConfigError(f"--score-limit must be >= 2 inputs per set, got {args.score_limit}")
        presets = flow_args(args.flow_arg, sorted({c.flow for c in configs}))
        overrides = merged_overrides(args.overrides)
        start = time.perf_counter()
        prov = {"command": provenance.command(), "commit": provenance.commit(), "machine": provenance.machine()}
        train, sets, setting = load_features(overrides, args.out / args.table)
        setting["provenance"] = prov
        check_configs(configs, train.shape[1])
        fit = lde_fit_settings(setting["seed"])
        sets = subsample(sets, args.score_limit)
        setting.update(fit, score_limit=args.score_limit, scored={k: len(v) for k, v in sets.items()},
                       flow_args=args.flow_arg, flows=presets)
        paths: list[Path] = []

        def write(rows: list[Row]) -> None:
            prov["machine"]["load_1min_end"] = provenance.load_average()
            setting.update(fit_samples=rows[0].fit_samples, fit_steps=rows[0].fit_steps,
                           wall_s=round(time.perf_counter() - start, 1), rows_done=f"{len(rows)}/{len(configs)}")
            paths[:] = write_outputs(args.table, rows, setting, args.out)

        run_table(configs, train, sets, fit, presets=presets, device=setting["device"], on_row=write)
    except OODLightningError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(paths[0].read_text())
    print("wrote " + ", ".join(str(p) for p in paths) + f" in {setting['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
