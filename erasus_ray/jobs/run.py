"""Running a :class:`~erasus_ray.jobs.config.UserJobConfig`: read the model and data, split forget / retain /
held-out by the data's ids, unlearn with :class:`~erasus_ray.ErasusUnlearner`, measure before and after, and write
the unlearned model (in the input's format), ``results.json`` and ``metrics.png`` to ``output``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset, Subset

from erasus_ray.errors import InvalidDataError
from erasus_ray.evaluation import run_metrics
from erasus_ray.evaluation.metrics import metric_names_for
from erasus_ray.jobs._imports import load_callable
from erasus_ray.jobs.config import UserJobConfig
from erasus_ray.jobs.items import classifier_dataset, token_dataset
from erasus_ray.jobs.models import LoadedModel, load_model, save_model
from erasus_ray.jobs.rows import split_masks, table_ids
from erasus_ray.jobs.stream_job import collect_pass, stream_coreset, unlearn_stream, wants_streaming
from erasus_ray.jobs.tables import Table, read_table, table_from_factory
from erasus_ray.tasks import Task, get_task
from erasus_ray.utils.atomic import atomic_write_text, remove_durably


@dataclass
class JobData:
    """The job's samples as id datasets over one table: the forget, retain and (optional) held-out sets."""

    forget: Subset
    retain: Subset
    heldout: Subset | None
    source: str

    def summary(self, id_column: str) -> dict[str, Any]:
        ids = self.forget.dataset.ids  # type: ignore[attr-defined]
        return {"source": self.source, "id_column": id_column, "n_forget": len(self.forget),
                "n_retain": len(self.retain), "n_heldout": 0 if self.heldout is None else len(self.heldout),
                "forget_ids": ids[self.forget.indices].tolist()}


def read_job_table(cfg: UserJobConfig) -> Table:
    data = cfg.data
    if data.get("path") is not None:
        return read_table(cfg.path(data["path"]), split=data.get("split"))
    make = load_callable(data["factory"], "data.factory", cfg._base_dir)
    return table_from_factory(make, data.get("factory_args", {}), "data.factory")


def build_dataset(cfg: UserJobConfig, table: Table, ids: np.ndarray, task: Task, tokenizer: Any) -> Dataset:
    """The table's rows as items (:mod:`erasus_ray.jobs.items`): ``(x, y)`` pairs when the job names a
    ``label_column`` over numeric features (classifiers), else one dict per row (token tasks: causal LM, seq2seq,
    and sequence classifiers, whose dicts carry the label)."""
    data = cfg.data
    label = data.get("label_column")
    if label is not None and data.get("text_column") is None and "input_ids" not in table.columns:
        return classifier_dataset(table, ids, features=data.get("features"), label_column=label,
                                  id_column=data["id_column"])
    return token_dataset(table, ids, features=data.get("features"), tokenizer=tokenizer,
                         text_column=data.get("text_column"), target_column=data.get("target_column"), label_column=label)


def split_rows(cfg: UserJobConfig, table: Table, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Row indices of forget, retain and held-out (None: no held-out rows); see :func:`split_masks`."""
    forget, retain, heldout = split_masks(cfg.data, table, ids, cfg._base_dir)
    return np.flatnonzero(forget), np.flatnonzero(retain), (np.flatnonzero(heldout) if heldout.any() else None)


def load_job_data(cfg: UserJobConfig, task: Task, tokenizer: Any) -> JobData:
    table = read_job_table(cfg)
    ids = table_ids(table, cfg.data["id_column"])
    forget, retain, heldout = split_rows(cfg, table, ids)
    dataset = build_dataset(cfg, table, ids, task, tokenizer)
    return JobData(Subset(dataset, forget.tolist()), Subset(dataset, retain.tolist()),
                   None if heldout is None else Subset(dataset, heldout.tolist()), table.source)


def job_metrics(model: Any, task: Task, data: JobData, seed: int) -> dict[str, float]:
    """The task's default metrics on forget / retain / held-out (as the ``test`` split); one forward pass per split."""
    from erasus_ray.data import as_id_dataset

    splits = {"forget": as_id_dataset(data.forget), "retain": as_id_dataset(data.retain),
              "test": None if data.heldout is None else as_id_dataset(data.heldout)}
    return run_metrics(model, task, splits, metric_names_for(task), seed=seed)


def run_user_job(cfg: UserJobConfig, *, out: str | Path | None = None, progress: bool = True,
                 selector: str | None = None, k: int | None = None) -> dict[str, Any]:
    """Run the job and write its outputs (see the module docstring); returns the results document. A job whose data
    is a stream (``data.streaming``, or a factory that returns one) runs :func:`run_streamed_job` instead.

    ``selector`` / ``k`` override the config's (``--coreset-from`` / ``--coreset-k``)."""
    from erasus_ray.unlearner import ErasusUnlearner

    if wants_streaming(cfg):
        return run_streamed_job(cfg, out=out, progress=progress, selector=selector, k=k)
    loaded = load_model(cfg.model, cfg._base_dir)
    task = get_task(cfg.task, loaded.model)
    data = load_job_data(cfg, task, loaded.tokenizer)
    unlearner = ErasusUnlearner(
        loaded.model, strategy=cfg.strategy, selector=selector or cfg.selector, fraction=cfg.fraction,
        k=k if k is not None else cfg.k, target=cfg.target, task=task, seed=cfg.seed, progress=progress,
        selector_kwargs=cfg.selector_params, runner=cfg.runner, execution=cfg.execution, **cfg.strategy_params)
    before = job_metrics(loaded.model, task, data, cfg.seed)
    result = unlearner.fit(data.forget, data.retain, heldout_data=data.heldout)
    after = job_metrics(result.model, task, data, cfg.seed)
    return finish_job(cfg, out, loaded, task, result, before, after, data.summary(cfg.data["id_column"]))


def run_streamed_job(cfg: UserJobConfig, *, out: str | Path | None = None, progress: bool = True,
                     selector: str | None = None, k: int | None = None) -> dict[str, Any]:
    """The job over a stream (:mod:`erasus_ray.jobs.stream_job`): count, score the forget rows for a top-k coreset,
    collect it with retain / held-out samples, then unlearn in closed-loop rounds judged on every forget row of the
    stream (:func:`~erasus_ray.jobs.stream_job.unlearn_stream`): ``verified`` and ``verification`` are that
    whole-stream verdict, and ``metrics_before`` / ``metrics_after`` cover every streamed row."""
    from erasus_ray.unlearner import ErasusUnlearner

    loaded = load_model(cfg.model, cfg._base_dir)
    task = get_task(cfg.task, loaded.model)
    build = lambda chunk, ids: build_dataset(cfg, chunk, ids, task, loaded.tokenizer)
    coreset, splits = stream_coreset(cfg, loaded.model, task, build, selector=selector, k=k)
    sets = collect_pass(cfg, build, coreset.ids)
    make = lambda model, target: ErasusUnlearner(  # noqa: E731
        model, strategy=cfg.strategy, selector=None, fraction=1.0, target=target, task=task, seed=cfg.seed,
        progress=progress, runner=cfg.runner, execution=cfg.execution, **cfg.strategy_params)
    run = unlearn_stream(cfg, build, task, loaded.model, sets, make)
    run.result.config["target"] = cfg.target  # the configured target (the rounds were handed its resolved object)
    retain, heldout = sets[1], sets[2]
    summary = {"source": str(cfg.data.get("path") or cfg.data.get("factory")), "id_column": cfg.data["id_column"],
               "streamed": True, **{f"n_{name}": n for name, n in splits.counts.items()},
               "n_retain_sampled": len(retain), "n_heldout_sampled": 0 if heldout is None else len(heldout),
               "stream_coreset": {"ids": coreset.ids.tolist(), "selector": coreset.selector, **coreset.info},
               "final_coreset_ids": run.coreset.ids.tolist()}
    return finish_job(cfg, out, loaded, task, run.result, run.before, run.after, summary)


def finish_job(cfg: UserJobConfig, out: str | Path | None, loaded: LoadedModel, task: Task, result: Any,
               before: dict[str, float], after: dict[str, float], data_summary: dict[str, Any]) -> dict[str, Any]:
    """Write the unlearned model, ``results.json`` and ``metrics.png``; returns the results document."""
    result.metrics = after
    # --out is relative to the working directory; the config's output, like its other paths, to the config's folder
    folder = Path(out) if out is not None else cfg.path(cfg.output) if cfg.output else Path("results/own-data")
    doc = {"output": str(folder), "job": cfg.to_dict(), "data": data_summary,
           "metrics_before": before, "metrics_after": after, "verified": result.verified, **result.to_dict()}
    publish(folder, loaded, result.model, doc)
    _plot(folder, before, after, result, task)
    return doc


def publish(folder: Path, loaded: LoadedModel, model: Any, doc: dict[str, Any]) -> None:
    """Model first, results last (as :meth:`~erasus_ray.UnlearningResult.save`): a results file on disk always
    describes the model beside it."""
    from erasus_ray.unlearner import _json_default

    folder.mkdir(parents=True, exist_ok=True)
    remove_durably(folder / "results.json")
    doc["model_file"] = save_model(loaded, model, folder)
    atomic_write_text(folder / "results.json", json.dumps(doc, indent=2, default=_json_default))


def _plot(folder: Path, before: dict[str, float], after: dict[str, float], result: Any, task: Task) -> None:
    from erasus_ray.cli.report import plot_rows
    from erasus_ray.evaluation import display_names_for

    keys = [k for k in display_names_for(task) if k in after]
    rows = [{"label": "original", "metrics": before, "timings": {}},
            {"label": "unlearned", "metrics": after, "timings": result.timings}]
    plot_rows(rows, keys, folder / "metrics.png", "before / after unlearning")


def run_user_job_file(path: str | Path, **kwargs: Any) -> dict[str, Any]:
    """:func:`run_user_job` of the YAML at ``path``."""
    return run_user_job(UserJobConfig.from_yaml(path), **kwargs)
