"""Atomic writes: a reader sees the old file or the new one, never a part; nothing is left behind."""

from __future__ import annotations

import numpy as np
import pytest

from ood_lightning.core.io import atomic_write, atomic_write_text


def test_text_is_replaced_whole(tmp_path):
    path = tmp_path / "metrics.json"
    atomic_write_text(path, "old")
    atomic_write_text(path, '{"new": 1}')
    assert path.read_text() == '{"new": 1}' and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_a_writer_that_fails_half_way_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "scores.npz"
    atomic_write(path, lambda p: np.savez_compressed(p, a=np.arange(3)))

    def half_then_crash(p):
        p.write_bytes(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half_then_crash)
    assert np.load(path)["a"].tolist() == [0, 1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["scores.npz"]


@pytest.mark.parametrize("name, save", [("scores.npz", lambda p: np.savez_compressed(p, a=np.arange(3))),
                                        ("cache.npy", lambda p: np.save(p, np.arange(3)))])
def test_numpy_writers_keep_the_target_name(tmp_path, name, save):
    """np.save / np.savez append their suffix to a path without it: the temporary name must keep it."""
    atomic_write(tmp_path / name, save)
    assert [p.name for p in tmp_path.iterdir()] == [name]
    loaded = np.load(tmp_path / name)
    assert (loaded["a"] if name.endswith(".npz") else loaded).tolist() == [0, 1, 2]


def test_file_mode_follows_the_umask_like_a_plain_write(tmp_path):
    plain, atomic = tmp_path / "plain.txt", tmp_path / "atomic.txt"
    plain.write_text("x")
    atomic_write_text(atomic, "x")
    assert atomic.stat().st_mode == plain.stat().st_mode
