"""Host syncs: the counter sees what would make a GPU wait, and training steps make none.

On a GPU every read of a device value on the host stalls the launch queue; these tests find
such reads on the CPU (``ood_lightning/core/host_sync.py``) and pin the per-step count of the
training loops, so a stray ``.item()`` in a training step fails here before it costs GPU time.
"""

from __future__ import annotations

import json

import pytest
import torch

from ood_lightning.core.host_sync import HostSyncCounter
from ood_lightning.run.runs import train
from tests.conftest import TINY, compose_cfg


def test_counter_sees_reads_of_device_tensors_and_their_descendants():
    w = torch.randn(5, requires_grad=True)
    with HostSyncCounter(device_tensors=[w]) as c:
        loss = (w * 2).sum()
        loss.item()                        # 1: a value computed from a device tensor
        bool(torch.isfinite(loss))         # 2
        _ = w[w > 0]                        # 3: boolean-mask indexing has a data-dependent size
        loss.backward()
        float(w.grad.sum())                # 4: gradients are on the device too
        torch.nonzero(w.detach() > 0)      # 5
    assert [e.op.split()[0] for e in c.events] == ["item()/bool()/float()", "item()/bool()/float()", "x[bool",
                                                   "item()/bool()/float()", "nonzero"]
    assert all("test_host_sync.py" in e.where for e in c.events)


def test_counter_leaves_out_values_that_stay_on_the_host():
    w = torch.randn(5)
    step = torch.tensor(3.0)               # like an optimiser's step counter: a CPU tensor by design
    with HostSyncCounter(device_tensors=[w]) as c:
        step.add_(1)
        int(step)
        int(torch.empty(()).geometric_(0.5))  # a random draw made on the CPU
        (w + 1).sum()                         # device work with no host read
    assert c.events == []
    with HostSyncCounter() as c:             # without device tensors every read counts
        int(step)
        float(w.sum())
    assert len(c.events) == 2


def _syncs(tmp_path, overrides):
    tiny = [o for o in TINY if o != "debug=fast"]
    cfg = compose_cfg("train", [*tiny, "debug=[fast,host_syncs]", "detectors=fast", "trainer.limit_train_batches=8",
                                "trainer.max_epochs=1", *overrides], tmp_path)
    train(cfg)
    return json.loads((tmp_path / "host_syncs.json").read_text())


@pytest.mark.parametrize("method", ["classifier", "dhm"])
def test_training_steps_read_nothing_on_the_host_between_loss_checks(tmp_path, method):
    """With the loss read every k steps (as on CUDA), steady-state steps make no sync at all."""
    every_step = _syncs(tmp_path / "k1", [f"method={method}", "nan_check_every=1"])
    assert every_step["per_step"] == [1] * 5  # the non-finite check's read, nothing else
    assert [s["where"].split(":")[0] for s in every_step["sites"]] == ["ood_lightning/methods/nonfinite.py"]
    deferred = _syncs(tmp_path / "k4", [f"method={method}", "nan_check_every=4"])
    # steps 2..6 counted (the last one ran the epoch end); windows 0-3 and 4-7 close in steps 3 and 7
    assert deferred["per_step"] == [0, 1, 0, 0, 0]


def test_vmdls_triplet_loss_makes_no_sync(tmp_path):
    res = _syncs(tmp_path, ["method=vmdls", "backbone.widths=[8,8,16]", "method.latent_dim=4",
                            "method.samples_per_class=16", "method.autoencoder.widths=[4,8]",
                            "method.autoencoder.bottleneck=2", "nan_check_every=1000"])
    assert res["per_step"] and set(res["per_step"]) == {0}, res["sites"]
