"""Offline benchmark tasks: data, model, recipe, and the cached original and gold (retrained) models.

A :class:`BenchmarkSpec` says how to build a task's data and model; :func:`load_benchmark` trains (or loads from
the on-disk cache, keyed by a hash of the full config and seed) the *original* model on the whole training set
and the *gold* model on the retain set with the same recipe. Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np
import torch
from torch import nn

from erasus_ray.training import TrainRecipe, train_model
from erasus_ray.data import IdDataset
from erasus_ray.errors import InvalidConfigError
from erasus_ray.tasks import Task
from erasus_ray.utils import seed_everything
from erasus_ray.utils.atomic import atomic_torch_save, atomic_write_text

CACHE_VERSION = 1


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$ERASUS_RAY_CACHE``, else ``~/.cache/erasus-ray``."""
    root = cache_dir or os.environ.get("ERASUS_RAY_CACHE") or Path.home() / ".cache" / "erasus-ray"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass
class TaskData:
    """What a spec builds: the training set (ids = stable sample ids), the test/held-out set, the forget ids."""

    train: IdDataset
    test: IdDataset
    forget_ids: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)


class BenchmarkSpec(ABC):
    """A benchmark task. Subclasses build data and models; caching and training are shared."""

    name: str = "benchmark"
    scenarios: tuple[str, ...] = ()
    default_scenario: str = ""
    #: The adapter class :meth:`make_task` returns: what its task declares (capabilities, name) is read from it
    #: without building the benchmark (the authors tokenizer), e.g. to validate a sweep's strategies.
    task_class: ClassVar[type[Task]] = Task

    def __init__(self, **options: Any) -> None:
        self.options = options
        #: where the task may cache derived files (set by :func:`build_benchmark`)
        self.cache_dir: Path | None = None

    @abstractmethod
    def build_data(self, scenario: str, seed: int) -> TaskData: ...

    @abstractmethod
    def build_model(self, seed: int) -> nn.Module: ...

    @abstractmethod
    def make_task(self) -> Task: ...

    @classmethod
    def declared_task(cls) -> Task:
        """The adapter whose capabilities a sweep plans with, built without building the benchmark: a default
        instance of :attr:`task_class`. A benchmark whose default instance declares less than its :meth:`make_task`
        (``clip``: a contrastive adapter without captions has no logits) overrides it."""
        return cls.task_class()

    @abstractmethod
    def recipe(self, seed: int) -> TrainRecipe: ...

    def train(self, model: nn.Module, data: IdDataset, task: Task, recipe: TrainRecipe, desc: str = "train") -> nn.Module:
        """Train ``model`` in place on ``data`` with ``recipe`` (the original on the training set, the gold model on the
        retain set: same method for both). Default: :func:`~erasus_ray.training.train_model`; a spec with a cheaper
        way to fit its model (e.g. fine-tuning a pretrained model's top layers) overrides it."""
        return train_model(model, data, task, recipe, progress=True, desc=desc)

    def config(self, scenario: str, seed: int) -> dict[str, Any]:
        return {
            "benchmark": self.name,
            "scenario": scenario,
            "seed": seed,
            "options": self.options,
            "recipe": self.recipe(seed).to_dict(),
            "cache_version": CACHE_VERSION,
        }


@dataclass
class Benchmark:
    """A built benchmark: data splits by id, task adapter, recipe, original and gold models, and their costs."""

    name: str
    scenario: str
    seed: int
    task: Task
    train: IdDataset
    test: IdDataset
    forget_ids: np.ndarray
    retain_ids: np.ndarray
    recipe: TrainRecipe
    model_factory: Callable[[], nn.Module]
    original: nn.Module
    #: ``None`` only when built with ``gold=False`` (a check that needs the original alone skips the retrain)
    gold: nn.Module | None
    seconds: dict[str, float]
    info: dict[str, Any]
    config: dict[str, Any]

    @property
    def forget(self) -> IdDataset:
        return self.train.subset(self.forget_ids)

    @property
    def retain(self) -> IdDataset:
        return self.train.subset(self.retain_ids)


def _train_cached(
    path: Path, factory: Callable[[], nn.Module], data: IdDataset, task: Task, recipe: TrainRecipe, desc: str,
    train: Callable[..., nn.Module] | None = None,
) -> tuple[nn.Module, float]:
    """``(model, training seconds)``: loaded from ``path`` if cached, else trained with ``train`` (a spec's
    :meth:`BenchmarkSpec.train`; default :func:`~erasus_ray.training.train_model`) and saved."""
    model = factory()
    meta_path = path.with_suffix(".json")
    if path.exists() and meta_path.exists():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        model.eval()
        return model, float(json.loads(meta_path.read_text())["train_seconds"])
    start = time.perf_counter()
    if train is None:
        train_model(model, data, task, recipe, progress=True, desc=desc)
    else:
        train(model, data, task, recipe, desc=desc)
    seconds = time.perf_counter() - start
    # weights first, then the metadata whose presence marks the cache entry complete (both atomic)
    atomic_torch_save(model.state_dict(), path)
    atomic_write_text(meta_path, json.dumps({"train_seconds": seconds, "n_train": len(data)}))
    return model, seconds


def build_benchmark(
    spec: BenchmarkSpec, scenario: str | None = None, seed: int = 0, cache_dir: str | os.PathLike | None = None,
    gold: bool = True,
) -> Benchmark:
    """Build ``spec``: data splits, then the original and gold models (trained once, then loaded from cache).
    ``gold=False`` neither trains nor loads the gold model (``Benchmark.gold`` is ``None``)."""
    scenario = scenario or spec.default_scenario
    if scenario not in spec.scenarios:
        raise InvalidConfigError(f"unknown scenario {scenario!r} for {spec.name}; known: {', '.join(spec.scenarios)}")
    seed_everything(seed)
    root = cache_root(cache_dir)
    spec.cache_dir = root
    data = spec.build_data(scenario, seed)
    task = spec.make_task()
    recipe = spec.recipe(seed)
    config = spec.config(scenario, seed)
    key = hashlib.sha1(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]
    forget_ids = np.sort(np.asarray(data.forget_ids, dtype=np.int64))
    retain = data.train.exclude(forget_ids)

    def factory() -> nn.Module:
        return spec.build_model(seed)

    original, t_orig = _train_cached(root / f"{spec.name}-{key}-original.pt", factory, data.train, task, recipe, "original",
                                     spec.train)
    gold_model, t_gold = (_train_cached(root / f"{spec.name}-{key}-gold.pt", factory, retain, task, recipe, "retrain (gold)",
                                        spec.train) if gold else (None, None))
    return Benchmark(
        name=spec.name,
        scenario=scenario,
        seed=seed,
        task=task,
        train=data.train,
        test=data.test,
        forget_ids=forget_ids,
        retain_ids=np.sort(retain.ids),
        recipe=recipe,
        model_factory=factory,
        original=original,
        gold=gold_model,
        seconds={"train_original": t_orig, "retrain": t_gold},
        info=data.info,
        config=config,
    )
