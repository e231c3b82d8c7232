"""Sweeps over the user's own model and data: ``job: my_job.yaml`` in a sweep config names a job config
(:class:`~erasus_ray.jobs.UserJobConfig`) instead of a bundled benchmark. There is no model retrained without the
forget set to measure against, so each trial's ``avg_gap`` is the gap to a **reference built from held-out data and
the original model** (:func:`reference_metrics`):

* forget metrics should look like held-out ones: ``forget_<m>``'s reference is the original model's ``test_<m>`` on
  the job's ``heldout:`` rows (for a forget set that is whole classes, ``forget_acc``'s reference is 0: no other row
  of those classes is left to predict them from);
* utility should be kept: ``retain_<m>`` and ``test_<m>``'s references are the original model's own values;
* a gap metric with no such reference (membership-inference efficacy) is left out of ``avg_gap``.

The sweep then searches strategy x selector x fraction (closed loop by default: the controller runs each trial until
the job's target holds) and writes the same ``leaderboard.csv`` / ``.md`` / ``pareto.png`` as a benchmark sweep, with
an ``original`` reference row and no retrain row. ``data.heldout`` is required. Trials read the job's model and data
from the job's paths: on a multi-node cluster those must be on a file system every node sees.

Cost: the driver loads the job once and evaluates the original model (one forward pass per split); each trial loads
the job once per worker process (cached) and runs one unlearning job plus one evaluation.
"""

from __future__ import annotations

import time
from typing import Any

from erasus_ray.tuning.own_job import loaded_job
from erasus_ray.tuning.search_space import sampled_job
from erasus_ray.tuning.trials import flat_result


def reference_metrics(original: dict[str, float], task: Any, data: Any) -> dict[str, float]:
    """The gold-free reference of the module docstring, from the original model's metrics ``original``."""
    from erasus_ray.data import as_id_dataset
    from erasus_ray.evaluation import gap_names_for, metric_names_for
    from erasus_ray.evaluation.verification import removed_classes

    whole_classes = removed_classes(task, as_id_dataset(data.forget), as_id_dataset(data.retain)) is not None
    out: dict[str, float] = {}
    for key in gap_names_for(task, metric_names_for(task)):
        split, _, name = key.partition("_")
        if split == "forget" and whole_classes and name == "acc":
            out[key] = 0.0
        elif split == "forget" and f"test_{name}" in original:
            out[key] = float(original[f"test_{name}"])
        elif split in ("retain", "test") and key in original:
            out[key] = float(original[key])
    return out


def _evaluate(model: Any, task: Any, data: Any, seed: int, reference: dict[str, float] | None) -> dict[str, float]:
    from erasus_ray.evaluation import evaluate

    return evaluate(model, forget=data.forget, retain=data.retain, test=data.heldout, task=task, gold_metrics=reference,
                    seed=seed)


def own_reference_info(path: str, seed: int) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """In the driver: the reference metrics and the leaderboard's ``original`` row (its gap to the reference)."""
    _, loaded, task, data = loaded_job(path)
    original = _evaluate(loaded.model, task, data, seed, None)
    reference = reference_metrics(original, task, data)
    scored = _evaluate(loaded.model, task, data, seed, reference)
    row = {"label": "original", "avg_gap": float(scored["avg_gap"]), "seconds": 0.0,
           "metrics": {k: float(v) for k, v in scored.items() if isinstance(v, (int, float))}}
    return reference, [row]


def evaluate_own_trial(params: dict[str, Any], cfg: Any, reference: dict[str, float], *, seed: int | None = None,
                       device: str | None = None) -> dict[str, Any]:
    """One trial on the job: the sampled strategy x selector x fraction (closed loop: under the controller with the
    sweep's target and budget), evaluated against ``reference``; the row :func:`~erasus_ray.tuning.trials.flat_result`
    makes of it."""
    from erasus_ray.unlearner import ErasusUnlearner

    job, loaded, task, data = loaded_job(cfg.job)
    sampled = sampled_job(cfg, params, seed)
    budget = {k: getattr(cfg, k) for k in ("budget_steps", "budget_seconds") if getattr(cfg, k) is not None}
    target = cfg.target if cfg.closed_loop else job.target
    unlearner = ErasusUnlearner(
        loaded.model, strategy=sampled["strategy"], selector=sampled["selector"], fraction=sampled["fraction"],
        task=task, seed=sampled["seed"], progress=False, selector_kwargs=sampled["selector_params"],
        runner=sampled["runner"], execution=job.execution, target=target,
        **({"device": device} if device is not None else {}), **(budget if cfg.closed_loop else {}),
        **sampled["strategy_params"])
    start = time.perf_counter()
    result = unlearner.fit(data.forget, data.retain, heldout_data=data.heldout)
    metrics = _evaluate(result.model, task, data, sampled["seed"], reference)
    row = {"seed": sampled["seed"], "metrics": metrics, "timings": result.timings, "coreset_size": len(result.coreset),
           "verified": result.verified, "verification": result.verification, "n_forget": len(data.forget),
           "report": result.report.to_dict(), "config": result.config}
    row["timings"].setdefault("total", time.perf_counter() - start)
    return flat_result(row)
