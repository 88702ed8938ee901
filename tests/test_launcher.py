"""Cluster launchers: hydra/launcher=local runs each sweep job in its own process (submitit's
local executor) and evaluate.py aggregates them; hydra/launcher=slurm composes and renders the
submission a cluster would get (no cluster needed)."""

from __future__ import annotations

import pytest
from hydra.utils import instantiate

from tests.conftest import TINY, compose_cfg, run_script


def test_slurm_launcher_renders_one_task_per_gpu(tmp_path):
    from submitit.slurm.slurm import _make_sbatch_string

    cfg = compose_cfg("train", ["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=4",
                                "hydra.launcher.nodes=2", "+hydra.launcher.additional_parameters.qos=high"], tmp_path)
    from hydra.core.hydra_config import HydraConfig

    launcher = HydraConfig.get().launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.tasks_per_node == 4  # one DDP rank per GPU
    text = _make_sbatch_string(command="python train.py", folder=str(tmp_path), partition=launcher.partition,
                               nodes=launcher.nodes, ntasks_per_node=launcher.tasks_per_node,
                               gpus_per_node=launcher.gpus_per_node, cpus_per_task=launcher.cpus_per_task,
                               mem=f"{launcher.mem_gb}GB", time=launcher.timeout_min,
                               signal_delay_s=launcher.signal_delay_s,
                               additional_parameters=dict(launcher.additional_parameters))
    for line in ("#SBATCH --partition=gpu", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --mem=64GB", "#SBATCH --time=1440", "#SBATCH --qos=high", "#SBATCH --signal=USR2@120"):
        assert line in text, line
    assert cfg.trainer  # the job config itself still composes with the launcher chosen


def test_local_launcher_config_builds_the_launcher(tmp_path):
    compose_cfg("train", ["hydra/launcher=local"], tmp_path)
    from hydra.core.hydra_config import HydraConfig

    assert HydraConfig.get().launcher._target_.endswith("LocalLauncher")
    assert instantiate  # the launcher is instantiated by Hydra itself at -m time (next test)


@pytest.mark.slow
def test_local_launcher_runs_jobs_as_processes_and_they_aggregate(tmp_path):
    sweep = tmp_path / "sweep"
    res = run_script("train.py", "-m", "hydra/launcher=local", *TINY, "detectors=fast", "seed=0,1",
                     f"hydra.sweep.dir={sweep}", timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    job_logs = sorted((sweep / ".submitit").glob("*/*_0_log.out"))
    assert len(job_logs) == 2  # two submitit jobs, one process each
    assert (sweep / "0" / "metrics.json").exists() and (sweep / "1" / "metrics.json").exists()
    res = run_script("evaluate.py", f"run_dir={sweep}", timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = (sweep / "summary.md").read_text()
    assert "| msp |" in summary and "| 2 |" in summary  # both seeds in one row
