"""Run the curated mutations of ``tests/mutations/mutations.toml`` and print who kills each.

Every mutation is a small wrong implementation of one of the papers' ideas, written as
(file, exact old text, new text) plus the tests that must fail on it. For each one this script
copies the working tree (tracked and untracked, not ignored files) into a scratch folder once,
applies the patch there, runs only the named tests with ``pytest -x``, restores the file, and
prints a table: mutation, killed by (the first failing test), seconds. The working tree is
never touched.

    python tests/mutations/mutants.py              # all; exit 1 unless every mutation is killed
    python tests/mutations/mutants.py --fast       # the subset marked fast (CI)
    python tests/mutations/mutants.py --only dhm   # names containing "dhm"
    python tests/mutations/mutants.py --shard 0/2  # every second mutation (two shards side by side)
    python tests/mutations/mutants.py --check      # every patch applies, every named test exists; runs nothing

Each test run is a fork of this process, which has imported torch, Lightning, Hydra, scikit-learn
and pytest once (never the project's package), so a run costs the test, not the imports;
``--no-fork`` starts a fresh interpreter per run instead.

A patch that no longer applies (its old text is not in the file exactly once, e.g. after a file
moved) stops the run before anything else, naming the mutation and the fix. Before mutating, the
named tests run once on the unmutated copy and must pass (``--no-baseline`` skips that), so a
test that fails anyway cannot count as a kill.

Why not mutmut: it generates operator-level mutants of whole modules (thousands, mostly
equivalent or trivial) and has no mode for a hand-written patch list; the point here is a
reviewed list of the wrong implementations that would silently change each paper's method.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # the stdlib reader is 3.11+; pyproject's test extra installs tomli on 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
LIST = Path(__file__).with_name("mutations.toml")
#: pytest exit codes: 0 all passed, 1 some failed; anything else (interrupted, internal error,
#: usage error, nothing collected) means the run did not test the mutation
PASSED, FAILED = 0, 1


@dataclass
class Mutation:
    name: str
    method: str
    why: str
    file: str
    old: str
    new: str
    tests: list[str]
    fast: bool = False
    result: dict = field(default_factory=dict)


def load(path: Path = LIST) -> list[Mutation]:
    """The mutation list; a malformed entry is one clear error."""
    data = tomllib.loads(path.read_text())
    out, seen = [], set()
    for i, entry in enumerate(data.get("mutation", [])):
        missing = {"name", "method", "why", "file", "old", "new", "tests"} - set(entry)
        if missing:
            raise SystemExit(f"{path.name}: mutation #{i + 1} ({entry.get('name', '?')}) lacks {sorted(missing)}")
        if entry["name"] in seen:
            raise SystemExit(f"{path.name}: two mutations are named {entry['name']!r}")
        if entry["old"] == entry["new"]:
            raise SystemExit(f"{path.name}: mutation {entry['name']!r} changes nothing (old == new)")
        seen.add(entry["name"])
        out.append(Mutation(**{k: entry[k] for k in Mutation.__dataclass_fields__ if k in entry}))
    return out


def check(mutations: list[Mutation], root: Path = ROOT) -> list[str]:
    """Problems that stop the run: a patch that does not apply exactly once, a named test file missing."""
    problems = []
    for m in mutations:
        target = root / m.file
        if not target.is_file():
            problems.append(f"{m.name}: {m.file} does not exist (moved? update the mutation's `file`)")
            continue
        count = target.read_text().count(m.old)
        if count != 1:
            problems.append(f"{m.name}: its old text occurs {count} times in {m.file}, not once (the code changed "
                            "or moved: update the mutation's `file`/`old`)")
        for test in m.tests:
            test_file, _, test_name = test.partition("::")
            path = root / test_file
            if not path.is_file():
                problems.append(f"{m.name}: test file {test_file} does not exist")
            elif test_name and not re.search(rf"def {re.escape(test_name.split('[')[0])}\b", path.read_text()):
                problems.append(f"{m.name}: no test {test_name} in {test_file}")
    return problems


def scratch_copy(root: Path) -> Path:
    """The working tree as it is now (tracked and untracked, not ignored) in a fresh temporary folder."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=root, check=True,
                           capture_output=True).stdout.decode().split("\0")
    dest = Path(tempfile.mkdtemp(prefix="ood-mutants-"))
    for rel in filter(None, files):
        src = root / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def environment(scratch: Path) -> dict[str, str]:
    """The tests' environment: the scratch copy first on the path, the real tree's data root (asked of a
    fresh interpreter, so that this process never imports the package it is about to mutate)."""
    data_root = subprocess.run([sys.executable, "-c", "from ood_lightning.data.registry import default_data_root; "
                                "print(default_data_root())"], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                               capture_output=True, text=True, check=True).stdout.strip()
    return {**os.environ, "PYTHONPATH": str(scratch), "OOD_LIGHTNING_DATA": data_root,
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "WANDB_MODE": "offline"}


#: imported once here and inherited by every forked test run (their import is most of a short run's time);
#: the project's own package is never among them, so each fork imports the mutated copy
PRELOAD = ("numpy", "scipy.stats", "sklearn.metrics", "sklearn.mixture", "sklearn.svm", "torch", "lightning",
           "hydra", "omegaconf", "nflows.transforms", "matplotlib.pyplot", "pytest")


PYTEST_ARGS = ["-x", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "-rf", "-W", "ignore"]


def run_pytest(tests: list[str], scratch: Path, env: dict[str, str], timeout: float,
               fork: bool = True) -> tuple[int | None, str, float]:
    """(exit code or None on timeout, output, seconds) of ``pytest -x`` on the named tests: in a fork of
    this process (libraries already imported) or, with ``fork=False``, in a fresh interpreter."""
    if fork:
        return _run_forked(tests, scratch, env, timeout)
    cmd = [sys.executable, "-m", "pytest", *PYTEST_ARGS, *tests]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=scratch, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        out = (err.stdout or b"").decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        return None, out, time.perf_counter() - start
    return proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - start


def _run_forked(tests: list[str], scratch: Path, env: dict[str, str], timeout: float) -> tuple[int | None, str, float]:
    log = scratch.parent / f"{scratch.name}-pytest.log"
    start = time.perf_counter()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: run pytest in the scratch copy, exit with its code
        code = 3
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.environ.clear()
            os.environ.update(env)
            os.chdir(scratch)
            sys.path.insert(0, str(scratch))
            import pytest

            code = int(pytest.main([*PYTEST_ARGS, *tests]))
        except BaseException:  # noqa: BLE001  (anything: report it, never return into the parent's loop)
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
            break
        if time.perf_counter() - start > timeout:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            code = None
            break
        time.sleep(0.2)
    out = log.read_text(errors="replace") if log.exists() else ""
    log.unlink(missing_ok=True)
    return code, out, time.perf_counter() - start


def first_failure(output: str) -> str:
    found = re.search(r"^FAILED (\S+)", output, re.M)
    return found[1] if found else "?"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fast", action="store_true", help="only the mutations marked fast (the CI subset)")
    ap.add_argument("--only", nargs="+", default=None, help="only mutations whose name contains one of these")
    ap.add_argument("--shard", default=None, help="i/n: every n-th mutation from the i-th (0-based), for runs side by side")
    ap.add_argument("--check", action="store_true", help="check that every patch applies; run no tests")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the named tests")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per pytest run")
    ap.add_argument("--list", type=Path, default=LIST, help="the mutation list (TOML)")
    ap.add_argument("--no-fork", action="store_true", help="a fresh interpreter per test run (slower, no shared imports)")
    args = ap.parse_args(argv)

    mutations = load(args.list)
    if args.fast:
        mutations = [m for m in mutations if m.fast]
    if args.only:
        mutations = [m for m in mutations if any(s in m.name for s in args.only)]
    if args.shard:
        i, n = (int(v) for v in args.shard.split("/"))
        mutations = mutations[i::n]
    problems = check(mutations)
    if problems:
        print("mutations that no longer apply:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    if args.check:
        print(f"{len(mutations)} mutations apply, and every named test exists")
        return 0
    if not mutations:
        print("no mutation selected", file=sys.stderr)
        return 2

    fork = not args.no_fork and os.name == "posix"
    scratch = scratch_copy(ROOT)
    try:
        env = environment(scratch)
        if fork:
            import importlib

            for name in PRELOAD:
                importlib.import_module(name)
        where = subprocess.run([sys.executable, "-c", "import ood_lightning; print(ood_lightning.__file__)"], cwd=scratch,
                               env=env, capture_output=True, text=True).stdout.strip()
        if not where.startswith(str(scratch)):
            print(f"the scratch copy imports ood_lightning from {where!r}, not from {scratch}: refusing to run",
                  file=sys.stderr)
            return 2
        if not args.no_baseline:
            tests = list(dict.fromkeys(t for m in mutations for t in m.tests))
            code, out, secs = run_pytest(tests, scratch, env, args.timeout * 2, fork)
            if code != PASSED:
                print(f"the named tests do not pass on the unmutated tree ({secs:.0f} s), so nothing could count as a "
                      f"kill; first failure: {first_failure(out)}\n{out[-3000:]}", file=sys.stderr)
                return 2
            print(f"baseline: {len(tests)} named tests pass unmutated ({secs:.0f} s)", flush=True)
        for m in mutations:
            target = scratch / m.file
            original = target.read_text()
            target.write_text(original.replace(m.old, m.new, 1))
            try:
                code, out, secs = run_pytest(m.tests, scratch, env, args.timeout, fork)
            finally:
                target.write_text(original)
            if code == FAILED:
                m.result = {"status": "killed", "by": first_failure(out), "seconds": secs}
            elif code is None:
                m.result = {"status": "killed", "by": f"timeout after {args.timeout:.0f} s", "seconds": secs}
            elif code == PASSED:
                m.result = {"status": "SURVIVED", "by": "-", "seconds": secs}
            else:
                m.result = {"status": "ERROR", "by": f"pytest exit code {code}: " + out.strip().splitlines()[-1][:120]
                            if out.strip() else f"pytest exit code {code}", "seconds": secs}
            print(f"[{m.result['status']}] {m.name} ({secs:.0f} s): {m.result['by']}", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    print("\n| mutation | method | killed by | seconds |\n|---|---|---|---|")
    for m in mutations:
        by = m.result["by"] if m.result["status"] == "killed" else f"**{m.result['status']}** {m.result['by']}"
        print(f"| `{m.name}` | {m.method} | `{by}` | {m.result['seconds']:.0f} |")
    bad = [m.name for m in mutations if m.result["status"] != "killed"]
    total = sum(m.result["seconds"] for m in mutations)
    print(f"\n{len(mutations) - len(bad)} of {len(mutations)} mutations killed ({total:.0f} s of test runs)")
    if bad:
        print("not killed: " + ", ".join(bad), file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
