"""The mutation list (tests/mutations/mutations.toml) stays runnable: every patch applies exactly once
to the current tree and every test it names exists, so a moved file or a renamed test fails here,
in the ordinary suite, not first in ``make mutants``."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

MUTANTS = Path(__file__).parent / "mutations" / "mutants.py"


def _runner():
    spec = importlib.util.spec_from_file_location("mutants", MUTANTS)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("mutants", module)  # dataclasses resolve their module by name
    spec.loader.exec_module(sys.modules["mutants"])
    return sys.modules["mutants"]


def test_every_mutation_applies_and_names_existing_tests() -> None:
    runner = _runner()
    mutations = runner.load()
    assert runner.check(mutations) == []
    methods = {m.method for m in mutations}
    assert methods == {"DHM", "LDE", "VMDLS", "LSGM", "VAE thesis"}
    for method in methods:  # the mutations plus at least five more per method
        assert sum(m.method == method for m in mutations) >= 7, method
    assert any(m.fast for m in mutations)


def test_a_patch_that_no_longer_applies_is_named_with_the_fix(tmp_path) -> None:
    runner = _runner()
    (tmp_path / "a.py").write_text("x = 1\nx = 1\n")
    bad = [runner.Mutation("moved", "DHM", "-", "gone.py", "x", "y", ["tests/test_mutations.py"]),
           runner.Mutation("twice", "DHM", "-", "a.py", "x = 1", "x = 2", ["tests/test_mutations.py"]),
           runner.Mutation("no-test", "DHM", "-", "a.py", "x = 1\nx", "y", ["tests/nope.py"])]
    problems = runner.check(bad, root=tmp_path)
    assert any("moved: gone.py does not exist" in p for p in problems)
    assert any("twice: its old text occurs 2 times" in p for p in problems)
    assert any("no-test: test file tests/nope.py does not exist" in p for p in problems)
    with pytest.raises(SystemExit, match="lacks"):
        (tmp_path / "m.toml").write_text('[[mutation]]\nname = "x"\n')
        runner.load(tmp_path / "m.toml")
