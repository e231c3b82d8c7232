"""The deletion service's unlearning worker in a process of its own, for the durability trials
(tests/test_serve_durability.py): :func:`run` drives :class:`~erasus_ray.serve.UnlearningWorker` rounds until nothing is
pending, and SIGKILLs its own process at ``kill_point`` - a real process death at a chosen point, nothing else changed:

- ``mid_unlearning``: a timer fires ``delay`` seconds into the first round's unlearning run;
- ``before_publish``: on entering :meth:`ModelVersions.publish` (the run verified, nothing published);
- ``mid_publish``: after the new weights file is written, before ``versions.json`` names it;
- ``after_publish``: after the version is published, before the ledger records its requests;
- ``mid_record``: between the batch's ``unlearned`` and ``verified`` transactions;
- ``none``: run to the end.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

KILL_POINTS = ("mid_unlearning", "before_publish", "mid_publish", "after_publish", "mid_record")


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def config(state_dir: str) -> Any:
    from erasus_ray.serve import ServeConfig

    return ServeConfig(benchmark="wine", state_dir=state_dir, batch_size=2, max_detectable_auc=None, max_requests_per_minute=None)


def _arm(kill_point: str, delay: float) -> None:
    from erasus_ray.serve import versions as versions_module
    from erasus_ray.serve.versions import ModelVersions
    from erasus_ray.serve.worker import UnlearningWorker
    from erasus_ray.ledger import DeletionLedger

    if kill_point == "mid_unlearning":
        unlearn = UnlearningWorker._unlearn

        def timed(self, *args, **kwargs):
            threading.Timer(delay, _die).start()
            return unlearn(self, *args, **kwargs)

        UnlearningWorker._unlearn = timed
    elif kill_point == "before_publish":
        ModelVersions.publish = lambda *a, **k: _die()
    elif kill_point == "mid_publish":
        versions_module.atomic_write_text = lambda path, text: _die() if path.name == versions_module.INDEX else None
    elif kill_point == "after_publish":
        publish = ModelVersions.publish

        def then_die(self, *args, **kwargs):
            publish(self, *args, **kwargs)
            _die()

        ModelVersions.publish = then_die
    elif kill_point == "mid_record":
        record = DeletionLedger.record_results

        def second_dies(self, results):
            if any(r.get("new_state") in ("verified", "failed") for r in results.values()):
                _die()
            return record(self, results)

        DeletionLedger.record_results = second_dies


def run(state_dir: str, kill_point: str, delay: float = 0.2) -> None:
    import torch

    from erasus_ray.serve import DeletionService, UnlearningWorker

    torch.set_num_threads(1)
    service = DeletionService(config(state_dir))
    _arm(kill_point, delay)
    worker = UnlearningWorker(service)
    while worker.run_once() is not None:
        pass
    service.close()
