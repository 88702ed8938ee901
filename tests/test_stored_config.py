"""A checkpoint's stored run config is data, never code: a ``_target_`` the project's config groups
do not name is refused, at any depth, by every reader that rebuilds a model from it (evaluate.py,
the study scripts, the detector benchmark), before anything is built; the opt-in only warns.

The crafted files are the two of the security report: a tensors-only checkpoint whose config says
``backbone: {_target_: torch.load, f: <payload>, weights_only: false}``, or puts that node in
``method.optimizer.momentum`` (an argument of a ``_partial_`` node), beside a pickle whose payload
writes a marker file."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
import torch

from ood_lightning.core.errors import UnsafeCheckpointError
from ood_lightning.run.build import stored_config
from ood_lightning.run.config import to_dict
from ood_lightning.run.runs import train
from ood_lightning.run.stored_config import allowed_targets, check_stored_targets
from tests.conftest import CONF, TINY, compose_cfg, run_script

#: where each crafted form puts the code-running node
FORMS = {"top-level": ("backbone",), "nested": ("method", "optimizer", "momentum")}
ONE_LINE = {"top-level": "_target_=torch.load at backbone,", "nested": "_target_=torch.load at method.optimizer.momentum,"}


class WritesMarker:
    """Unpickled, it opens ``marker`` for writing (builtins.open: nothing of this module is needed)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A real tiny run's last.ckpt."""
    out = tmp_path_factory.mktemp("trained")
    train(compose_cfg("train", [*TINY, "detectors=none", "logger=none"], out))
    return out / "checkpoints" / "last.ckpt"


def craft(trained: Path, folder: Path, form: str) -> tuple[Path, Path]:
    """(crafted checkpoint in a run folder of its own, the marker its payload would write)."""
    (folder / "checkpoints").mkdir(parents=True)
    marker, payload = folder / "MARKER", folder / "payload.pkl"
    torch.save(WritesMarker(marker), payload)
    state = torch.load(trained, map_location="cpu", weights_only=True)
    node = state["ood_lightning_config"]
    *parents, last = FORMS[form]
    for key in parents:
        node = node[key]
    node[last] = {"_target_": "torch.load", "f": str(payload), "weights_only": False}
    ckpt = folder / "checkpoints" / "last.ckpt"
    torch.save(state, ckpt)  # tensors and plain containers: it reads with weights_only=True
    return ckpt, marker


def test_the_payload_runs_when_unpickled(tmp_path):
    """The stand-in is live: what the tests below keep from running does write the marker."""
    marker = tmp_path / "MARKER"
    torch.save(WritesMarker(marker), tmp_path / "payload.pkl")
    torch.load(tmp_path / "payload.pkl", weights_only=False).close()
    assert marker.exists()


# -- the check itself ------------------------------------------------------------------------

def test_every_preset_config_passes(tmp_path):
    """What train.py stores for each paper preset (and the demo) is accepted as it is."""
    for name in [None, *sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))]:
        cfg = compose_cfg("train", [f"experiment={name}"] if name else [], tmp_path / str(name))
        check_stored_targets(to_dict(cfg), f"experiment={name}")


@pytest.mark.parametrize("where, target", [
    ("backbone", "torch.load"),
    ("method.optimizer.momentum", "torch.load"),
    ("method.flow.hidden", "numpy.load"),
    ("method.scheduler", "torch.serialization.load"),
    ("backbone", "ood_lightning.core.checkpoints._read_unsafe"),  # a project function no config group names
    ("backbone", "torch.optim.SGD"),  # named by the presets, but under method only
    ("method.optimizer", "torch.optim.Optimizer.load_state_dict"),
    ("data.kwargs", "builtins.eval"),
    ("_target_", "os.system"),
])
def test_a_target_no_config_group_names_is_refused(where, target):
    config = {"backbone": {"_target_": "ood_lightning.nn.backbones.SmallCNN"},
              "method": {"_target_": "ood_lightning.methods.Classifier",
                         "optimizer": {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1},
                         "flow": {"_target_": "ood_lightning.nn.flows.build.build_flow", "_partial_": True}},
              "data": {"name": "stripes", "kwargs": {}}}
    check_stored_targets(config, "x")  # the project's own: accepted
    bad = copy.deepcopy(config)
    if where == "_target_":
        bad["_target_"] = target
    else:
        *parents, last = where.split(".")
        node = bad
        for key in parents:
            node = node[key]
        node[last] = {"_target_": target, "_args_": ["x"]}
    with pytest.raises(UnsafeCheckpointError) as err:
        check_stored_targets(bad, "ckpt_path=f.ckpt")
    assert f"_target_={target} at {where}," in str(err.value)
    assert "pass allow_unsafe_checkpoint=true" in str(err.value) and "\n" not in str(err.value)


def test_a_target_in_a_list_argument_is_found():
    config = {"method": {"_target_": "ood_lightning.methods.Classifier",
                         "milestones": [1, {"_target_": "torch.load", "f": "x"}]}}
    with pytest.raises(UnsafeCheckpointError, match=r"_target_=torch.load at method.milestones\[1\],"):
        check_stored_targets(config, "x")


def test_other_torch_optim_classes_are_allowed_under_method_only():
    for target in ("torch.optim.AdamW", "torch.optim.lr_scheduler.CosineAnnealingLR"):
        check_stored_targets({"method": {"opt": {"_target_": target}}}, "x")
        with pytest.raises(UnsafeCheckpointError):
            check_stored_targets({"backbone": {"_target_": target}}, "x")
    for target in ("torch.optim.Optimizer.state_dict", "torch.optim._functional", "torch.optim.lr_scheduler.warnings"):
        with pytest.raises(UnsafeCheckpointError):
            check_stored_targets({"method": {"opt": {"_target_": target}}}, "x")


def test_the_allow_list_is_the_config_groups():
    allowed = allowed_targets()
    assert "torch.optim.SGD" in allowed["method"] and "ood_lightning.nn.backbones.SmallCNN" in allowed["backbone"]
    assert "torch.optim.SGD" not in allowed["backbone"]
    assert "ood_lightning.detectors.MSP" in allowed["detectors"]
    names = {t for targets in allowed.values() for t in targets}
    assert not {n for n in names if not n.startswith(("ood_lightning.", "torch.optim.", "lightning.pytorch."))}


def test_opt_in_warns_and_builds(trained, tmp_path, caplog):
    ckpt, marker = craft(trained, tmp_path / "run", "nested")
    with caplog.at_level(logging.WARNING):
        cfg = stored_config(ckpt, allow_unsafe=True)
    assert cfg.method.optimizer.momentum._target_ == "torch.load"
    assert "can run code" in caplog.text and not marker.exists()  # only read: nothing was built yet


# -- every reader, in process (fast) and as a user runs it (slow) --------------------------------

@pytest.mark.parametrize("form", FORMS)
def test_rescore_refuses_before_building(trained, tmp_path, form):
    from ood_lightning.run.runs import rescore

    ckpt, marker = craft(trained, tmp_path / "run", form)
    with pytest.raises(UnsafeCheckpointError, match=ONE_LINE[form]):
        rescore(compose_cfg("evaluate", [f"ckpt_path={ckpt}", "detectors=fast"], tmp_path / "eval"))
    assert not marker.exists()


def _readers(ckpt: Path, out: Path) -> dict[str, list[str]]:
    """Each command that rebuilds a stored model: the script and its arguments."""
    return {
        "evaluate.py": [f"ckpt_path={ckpt}", "detectors=fast", f"hydra.run.dir={out / 'eval'}"],
        "sweeps/dhm_sensitivity.py": [str(ckpt), "--n", "8", "--out", str(out / "sens")],
        "sweeps/lde_undertraining.py": ["--ckpt", str(ckpt), "--epochs", "1", "--out", str(out / "lde.png")],
        "sweeps/vmdls_studies.py": ["latent", str(ckpt.parent.parent), "--out", str(out / "latent.png")],
        "benchmarks/detector_times.py": [str(ckpt), str(out / "times")],
    }


@pytest.mark.slow
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("script", list(_readers(Path("x"), Path("y"))))
def test_every_reader_refuses_with_one_line(trained, tmp_path, form, script):
    ckpt, marker = craft(trained, tmp_path / "run", form)
    res = run_script(script, *_readers(ckpt, tmp_path)[script])
    assert not marker.exists()
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    opt_in = "allow_unsafe_checkpoint=true" if script == "evaluate.py" else "--allow-unsafe-checkpoint"
    assert len(errors) == 1 and ONE_LINE[form] in errors[0] and f"pass {opt_in}" in errors[0], res.stderr[-3000:]
