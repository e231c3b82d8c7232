"""The starting models of the two strategies that cannot unlearn a benchmark's plain original model.

``sisa`` (Bourtoule et al., 2021, "Machine Unlearning", IEEE S&P) unlearns a SISA ensemble, so it needs one
trained the SISA way: :class:`~erasus_ray.SISATrainer` with the benchmark's model factory and training recipe,
``SISA_SHARDS`` shards x ``SISA_SLICES`` slices. ``certified_removal`` (Guo et al., 2020, "Certified Data Removal
from Machine Learning Models", ICML) needs a convex head at the exact optimum of its perturbed objective: the
original model with its linear head refitted over the frozen features by :func:`train_certified_head` (lam
``CERTIFIED_LAM``, sigma ``CERTIFIED_SIGMA``). The strategy leaderboard (``benchmarks/strategy_leaderboard/run.py``)
and the effect tests (``tests/test_effect_registry.py``) both start these strategies from here, so their numbers
describe the same models.
"""

from __future__ import annotations

import copy
import time
from typing import Any

from torch import nn

SISA_SHARDS, SISA_SLICES = 3, 2
CERTIFIED_LAM, CERTIFIED_SIGMA = 1e-3, 1.0

#: the strategies :func:`prepare_model` builds a starting model for
PREPARED = ("sisa", "certified_removal")


def prepare_model(name: str, bench: Any, seed: int) -> tuple[nn.Module, str, float] | None:
    """The model strategy ``name`` unlearns on benchmark ``bench`` (a :class:`~erasus_ray.benchmarks.Benchmark`),
    built from its training split with ``seed``: ``(model, label, seconds to build it)``; None for every strategy
    that unlearns the plain original model.

    Cost: ``sisa`` trains ``SISA_SHARDS`` constituents, each on ``1 / SISA_SHARDS`` of the training split in
    ``SISA_SLICES`` incremental stages (about the cost of one original training, see :class:`SISATrainer`);
    ``certified_removal`` one forward pass over the training split plus one Newton solve per class on the head's
    features.
    """
    start = time.perf_counter()
    if name == "sisa":
        from erasus_ray.training_sisa import SISATrainer

        model = SISATrainer(bench.model_factory, bench.recipe, num_shards=SISA_SHARDS, num_slices=SISA_SLICES, seed=seed,
                            task=bench.task).fit(bench.train)
        label = f"start: sisa (an ensemble of {SISA_SHARDS} shards x {SISA_SLICES} slices, SISATrainer)"
    elif name == "certified_removal":
        from erasus_ray.strategies.certified_removal import train_certified_head

        model = copy.deepcopy(bench.original)
        train_certified_head(model, bench.train, lam=CERTIFIED_LAM, sigma=CERTIFIED_SIGMA, seed=seed)
        label = f"start: certified_removal (the original with a certified head, lam {CERTIFIED_LAM:g}, sigma {CERTIFIED_SIGMA:g})"
    else:
        return None
    return model, label, time.perf_counter() - start
