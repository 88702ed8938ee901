"""DDP on the CPU (gloo): sharded, gathered evaluation gives exactly the single-process results.

Two processes train the tiny config with the device loader (each rank its half of every
epoch), then score their blocks of every split and gather the outputs before detectors and
metrics. Training with two processes is a different run from one process (half the
batches per rank), so the comparison is evaluation of the same weights: the checkpoint the
DDP run saved, scored again by one process (``ckpt_path=``: fit restores it and trains no
further). Validation is off, so that the ranks' BatchNorm statistics differ after the last
step (DDP re-broadcasts buffers only at the start of a forward): evaluation must first give
every rank rank 0's state.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.distributed as dist

from ood_lightning.data.device_loader import DeviceLoader
from ood_lightning.run.runs import train
from ood_lightning.scoring.api import Outputs
from ood_lightning.scoring.passes import _extract
from ood_lightning.scoring.ranks import SINGLE, Ranks
from tests.conftest import TINY, compose_cfg, run_script

torch.set_num_threads(1)


def test_rank_blocks_concatenate_to_the_single_pass():
    """What each rank extracts, gathered in rank order, equals one pass over the whole split."""
    from torch.utils.data import DataLoader

    from ood_lightning.data.datamodule import TensorData, _keep_batch
    from ood_lightning.data.registry import ArrayData
    from ood_lightning.methods import Classifier
    from ood_lightning.nn.backbones import SmallCNN

    torch.manual_seed(0)
    model = Classifier(SmallCNN(1, (4, 8), 8), num_classes=3, optimizer=None).eval()
    data = ArrayData(torch.randint(0, 256, (37, 1, 8, 8), dtype=torch.uint8), torch.arange(37) % 3)
    loader = DataLoader(TensorData(data), batch_size=8, collate_fn=_keep_batch)
    prep = lambda x: x.float() / 255  # noqa: E731

    def pass_over(ld):
        return _extract(model, ld, prep, torch.device("cpu"), None, "", None, None)

    with torch.no_grad():
        full = pass_over(loader)
        for world in (2, 3, 40):  # 40 ranks: some blocks are empty
            shards = [Ranks(r, world).shard(loader) for r in range(world)]
            parts = Outputs.cat([pass_over(s) for s in shards if s is not None])
            assert torch.equal(parts.labels, full.labels)
            assert torch.allclose(parts.logits, full.logits, atol=1e-6)
            assert all(torch.allclose(parts.layers[k], full.layers[k], atol=1e-6) for k in full.layers)
        device_shards = [Ranks(r, 2).shard(DeviceLoader(data.images, data.labels, 8)) for r in range(2)]
        assert torch.equal(Outputs.cat([pass_over(s) for s in device_shards]).labels, full.labels)
    # outside a process group the mapping is the plain call
    assert torch.equal(SINGLE.map_outputs(lambda o: o.labels, full), full.labels)
    assert Ranks.of_process_group() is SINGLE


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo")
def test_ddp_two_processes_score_like_one_process(tmp_path):
    ddp_dir, one_dir = tmp_path / "ddp", tmp_path / "one"
    res = run_script("train.py", *TINY, "trainer.devices=2", "trainer.strategy=ddp", "data.loader=gpu",
                     "trainer.limit_val_batches=0", f"hydra.run.dir={ddp_dir}", timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in res.stderr + res.stdout
    rank1_log = (ddp_dir / "train_ddp_process_1.log").read_text()
    assert "OOD evaluation split over 2 ranks (rank 1 scores its block" in rank1_log
    two = json.loads((ddp_dir / "metrics.json").read_text())

    one = train(compose_cfg("train", [*TINY, f"ckpt_path={ddp_dir / 'checkpoints' / 'last.ckpt'}",
                                      "trainer.limit_val_batches=0"], one_dir))
    assert two["accuracy"] == pytest.approx(one["accuracy"])
    assert set(two["results"]) == set(one["results"]) and len(one["results"]) == 9  # detectors=baselines
    for det, rows in one["results"].items():
        for ood, metrics in rows.items():
            assert two["results"][det][ood] == pytest.approx(metrics, abs=1e-9), (det, ood)
    a, b = np.load(ddp_dir / "scores.npz"), np.load(one_dir / "scores.npz")
    assert set(a.files) == set(b.files)
    for key in a.files:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-5, err_msg=key)
