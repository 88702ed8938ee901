"""eval_mode: eval inside the block, the caller's mode (per submodule) restored afterwards."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ood_lightning.nn.modes import eval_mode


@pytest.mark.parametrize("start_training", [True, False])
def test_eval_inside_and_previous_mode_after_even_on_error(start_training):
    net = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)).train(start_training)
    x = torch.randn(8, 3) * 5 + 2
    with eval_mode(net):
        assert not any(m.training for m in net.modules())
        # running statistics (0, 1) are used and left alone, as BatchNorm does in eval mode
        torch.testing.assert_close(net(x), net[0](x) / (1 + net[1].eps) ** 0.5)
    assert all(m.training == start_training for m in net.modules())
    with pytest.raises(RuntimeError, match="boom"), eval_mode(net):
        raise RuntimeError("boom")
    assert all(m.training == start_training for m in net.modules())
    assert torch.equal(net[1].running_mean, torch.zeros(3))
