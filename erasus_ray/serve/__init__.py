"""A deletion service (issue 18): serve a model, take authenticated deletion requests over HTTP, unlearn and verify
them in the background, publish the verified model as a new version.

- :class:`ServeConfig` (``config.py``): the YAML settings;
- :class:`DeletionService` (``service.py``): ledger, API keys (``keys.py``), ownership, data, model versions
  (``versions.py``);
- :func:`create_app` (``api.py``): the FastAPI app;
- :class:`UnlearningWorker` / :class:`WorkerLoop` (``worker.py``): the background unlearning rounds;
- :func:`erasus_ray.serve.app.build` (``app.py``): the Ray Serve application (imports Ray only there).
"""

from erasus_ray.serve.api import create_app
from erasus_ray.serve.config import DEFAULT_PORT, ServeConfig
from erasus_ray.serve.keys import ClientKeys, Principal
from erasus_ray.serve.service import DeletionService
from erasus_ray.serve.versions import ModelVersions, ServedModel
from erasus_ray.serve.worker import UnlearningWorker, WorkerLoop

__all__ = ["DEFAULT_PORT", "ClientKeys", "DeletionService", "ModelVersions", "Principal", "ServeConfig", "ServedModel",
           "UnlearningWorker", "WorkerLoop", "create_app"]
