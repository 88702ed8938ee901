"""A Hydra callback that makes a sweep with failed jobs exit non-zero, after every job ran.

``run_safely`` keeps a multirun going when a job fails (it writes the job's ``failed.json``
and returns), so without this the sweep would exit 0 and a scheduler or CI would count it a
success. At the end of the multirun the failed jobs are printed with their overrides and
one-line errors, then the process exits with status 1.

Jobs are known from ``on_job_end`` (the basic launcher runs them in this process) and from the
``failed.json`` files under the sweep folder (launchers that run jobs elsewhere).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from ood_lightning.evaluation.run_dir import FAILED_FILE, JobIssue, failure, first_line, is_stale


class FailedJobsExit(Callback):
    """``on_multirun_end``: list the failed jobs on stderr and exit 1 when there are any."""

    def __init__(self) -> None:
        self.jobs: dict[Path, JobReturn] = {}

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        self.jobs[Path(config.hydra.runtime.output_dir)] = job_return

    def failed_jobs(self, sweep_dir: Path) -> list[JobIssue]:
        found = {p.parent for p in sweep_dir.rglob(FAILED_FILE) if not is_stale(p, sweep_dir)} if sweep_dir.is_dir() else set()
        issues = []
        for run in sorted(found | set(self.jobs)):
            issue = failure(run)
            job = self.jobs.get(run)
            if issue is None and job is not None and job.status == JobStatus.FAILED:  # raised past run_safely
                issue = JobIssue(run, "failed", first_line(f"{type(job._return_value).__name__}: {job._return_value}"))
            if issue is not None:
                if job is not None:
                    issue.overrides = list(job.overrides or issue.overrides)
                issues.append(issue)
        return issues

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        issues = self.failed_jobs(sweep_dir)
        if not issues:
            return
        total = max(len(self.jobs), len({i.path for i in issues}))
        # the overrides every job shares (the sweep's fixed part) do not tell the jobs apart
        shared = set.intersection(*(set(j.overrides or ()) for j in self.jobs.values())) if len(self.jobs) > 1 else set()
        for issue in issues:
            issue.overrides = [o for o in issue.overrides if o not in shared] or issue.overrides
        lines = [f"error: {len(issues)} of {total} jobs failed (each has a failed.json; the other jobs ran):",
                 *(f"  {issue.line()}" for issue in issues)]
        print("\n".join(lines), file=sys.stderr, flush=True)
        raise SystemExit(1)
