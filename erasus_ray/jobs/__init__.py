"""Jobs on the user's own model and data: ``erasus-ray unlearn --config job.yaml`` with ``model:`` / ``data:`` /
``output:`` keys (:class:`UserJobConfig`). Loaders for Hugging Face folders, torch checkpoints and factories
(:mod:`~erasus_ray.jobs.models`); for saved ``datasets``, Parquet, CSV, JSON Lines, ``.npz`` and factories
(:mod:`~erasus_ray.jobs.tables`); forget / retain / held-out selections by id, id file, class or filter
(:mod:`~erasus_ray.jobs.rows`); the same job over a stream, in bounded memory (:mod:`~erasus_ray.jobs.stream_job`)."""

from erasus_ray.jobs.config import UserJobConfig, is_own_data_job
from erasus_ray.jobs.run import run_user_job, run_user_job_file

__all__ = ["UserJobConfig", "is_own_data_job", "run_user_job", "run_user_job_file"]
