"""The user's job config a ``job:`` sweep runs on (:mod:`erasus_ray.tuning.own_data`): loaded and checked for a
sweep, and built once per process. Below :mod:`erasus_ray.tuning.config`, which checks a sweep's ``job:`` with it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from erasus_ray.errors import InvalidConfigError

_LOADED: dict[tuple, Any] = {}


def load_own_job(path: str) -> Any:
    """The :class:`~erasus_ray.jobs.UserJobConfig` at ``path``, checked for a sweep: held-out rows named, not
    streamed. Errors name the sweep's ``job`` key."""
    from erasus_ray.jobs import UserJobConfig

    try:
        job = UserJobConfig.from_yaml(path)
    except InvalidConfigError as err:
        raise InvalidConfigError(f"job: {err}") from None
    if job.data.get("heldout") is None:
        raise InvalidConfigError(f"job: {path} has no data.heldout; a sweep over your data measures each trial against "
                                 "held-out rows (the forget set should look like them), so name some")
    if job.data.get("streaming"):
        raise InvalidConfigError(f"job: {path} streams its data; a sweep's trials run on in-memory sets (set "
                                 "data.streaming: false, or sweep a sample of the data)")
    return job


def loaded_job(path: str) -> tuple[Any, Any, Any, Any]:
    """``(job config, loaded model, task, job data)`` of the job at ``path``, built once per process (trials reusing
    a worker skip the load; the unlearner works on a copy of the model)."""
    from erasus_ray.jobs.models import load_model
    from erasus_ray.jobs.run import load_job_data
    from erasus_ray.tasks import get_task

    file = Path(path)
    key = (str(file.resolve()), file.stat().st_mtime_ns)
    if key not in _LOADED:
        _LOADED.clear()  # one job at a time: a worker never needs two
        job = load_own_job(path)
        loaded = load_model(job.model, job._base_dir)
        task = get_task(job.task, loaded.model)
        _LOADED[key] = (job, loaded, task, load_job_data(job, task, loaded.tokenizer))
    return _LOADED[key]
