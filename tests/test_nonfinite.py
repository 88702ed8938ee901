"""The non-finite guard: a deferred check names the same first bad step and terms as an immediate one."""

from __future__ import annotations

import math

import pytest
import torch

from ood_lightning.methods.nonfinite import NonFiniteGuard


def _losses(n: int, bad: dict[int, float]):
    for step in range(n):
        ce = torch.tensor(bad.get(step, 1.0 + step))
        yield step, ce, {"ce": ce, "kl": torch.tensor(float(step))}


def _run(guard, n, bad):
    for step, loss, terms in _losses(n, bad):
        found = guard.check(loss, terms, epoch=0, step=step)
        if found is not None:
            return step, found
    return None, guard.flush()


@pytest.mark.parametrize("every", [1, 2, 4, 7])
def test_first_bad_step_and_its_terms_whatever_the_window(every):
    bad = {5: math.nan, 6: math.inf}  # the second must not overwrite the first
    detected_at, found = _run(NonFiniteGuard(every), 20, bad)
    assert (found.epoch, found.step) == (0, 5)
    assert math.isnan(found.terms["ce"]) and found.terms["kl"] == 5.0
    window_end = (5 // every + 1) * every - 1
    assert detected_at == window_end and found.steps_late == window_end - 5


def test_flush_reads_a_window_that_has_not_filled():
    guard = NonFiniteGuard(every=50)
    detected_at, found = _run(guard, 10, {8: math.inf})
    assert detected_at is None and found.step == 8 and found.terms["ce"] == math.inf and found.steps_late == 1
    assert guard.flush() is None  # nothing pending afterwards


def test_finite_losses_never_stop_and_separate_call_sites_keep_separate_windows():
    guard = NonFiniteGuard(every=3)
    for step in range(9):
        assert guard.check(torch.tensor(1.0), {"a": torch.tensor(1.0)}, 0, step) is None
        found = guard.check(torch.tensor(math.nan if step == 4 else 1.0), {"b": torch.tensor(2.0)}, 0, step)
        if found is not None:
            break
    assert step == 5 and found.step == 4 and set(found.terms) == {"b"}


def test_bad_setting_is_refused():
    with pytest.raises(ValueError, match="nan_check_every must be >= 1"):
        NonFiniteGuard(0)
