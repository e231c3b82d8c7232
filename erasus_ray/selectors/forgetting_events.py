"""Forgetting events (Toneva, Sordoni, Combes, Trischler, Bengio & Gordon, ICLR 2019, "An Empirical Study of
Example Forgetting during Deep Neural Network Learning")."""

from __future__ import annotations

import copy
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from erasus_ray.data import IdDataset, as_id_dataset, make_loader
from erasus_ray.errors import InvalidConfigError, InvalidDataError
from erasus_ray.selectors._reference import union_with_ids
from erasus_ray.selectors.base import SELECTORS, Coreset, ScoreSelector
from erasus_ray.tasks import Capability, Task
from erasus_ray.training import make_optimizer
from erasus_ray.utils import model_device, seed_everything


def count_forgetting_events(correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(events [n], learned [n])`` from a ``[n, T]`` 0/1 correctness matrix (presentation order along axis 1).

    A forgetting event is a transition correct -> incorrect between consecutive presentations; ``learned`` is
    whether the sample was ever classified correctly."""
    c = np.asarray(correct).astype(bool)
    if c.ndim != 2:
        raise InvalidDataError(f"dynamics must be a [n_samples, n_presentations] matrix, got shape {c.shape}")
    events = (c[:, :-1] & ~c[:, 1:]).sum(1) if c.shape[1] > 1 else np.zeros(len(c), dtype=np.int64)
    return events.astype(np.int64), c.any(1)


@SELECTORS.register("forgetting_events")
class ForgettingEventsSelector(ScoreSelector):
    """Score each forget sample by its number of forgetting events: how often it went from correctly to wrongly
    classified between consecutive presentations during training. Samples never learned count as forgotten
    infinitely often (as in the paper); since scores must be finite they get ``T`` (the number of presentations),
    more than any learned sample can reach (at most ``T // 2`` events), and are listed in ``info["never_learned"]``.

    Dynamics: ``dynamics=`` (constructor or ``select(..., dynamics=...)``): a mapping ``id -> sequence of 0/1
    correctness`` (one entry per presentation, e.g. per epoch), or a ``[n_forget, T]`` array whose rows are the
    forget ids in ascending order. Sequences may differ in length (counted as given). Without recorded dynamics
    a short seeded proxy training is replayed (where the paper leaves freedom: what is trained): a fresh model
    from ``model_factory`` (constructor or ``select(..., model_factory=...)``) if given, else a copy of the model,
    trained ``epochs`` epochs on forget + retain (``retain=``, which the unlearner passes; forget only without it)
    with ``optimizer`` / ``lr`` / ``batch_size``; each forget sample's correctness is read from the training forward
    pass every time its minibatch is presented, before the step, exactly as the paper records it.
    ``info["dynamics"]`` says which source was used.

    ``order="high"`` (default) keeps the most forgotten (least stable) samples: the paper's "forgettable" examples,
    which it shows carry the information that unforgettable ones (prunable without loss) do not.

    Measured on digits (10% coreset, ``grad_diff``, 3 seeds, mean Avg.Gap to the retrained model; ``random``: 0.0083 on
    class 3, 0.028 on random10): replayed from a fresh model (``model_factory``, 8 epochs):
    class 3: 0.0033; fine-tuned copy of the model (default without a factory): class 3: 0.0063, random10: 0.068.

    Cost: with given dynamics, O(n T); replayed: ``epochs`` training epochs over forget + retain (one forward and
    backward per sample per epoch, batched).

    Example:
        >>> coreset = ForgettingEventsSelector().select(model, forget, k=20, dynamics={7: [0, 1, 0, 1], 9: [1, 1, 1, 1]})
        >>> ForgettingEventsSelector(model_factory=make_model, epochs=10).select(model, forget, k=20, retain=retain)
    """

    #: counts accuracy flips (sample_accuracy) while training a copy.
    requires = frozenset({Capability.LOGITS})

    default_order = "high"
    forward_only = False
    #: Replayed training runs over the whole forget + retain set: run centrally, not per shard.
    distributed_merge = "central"
    central_reason = ("needs the whole set's training dynamics: given ones, or a replayed proxy training over "
                      "forget + retain (model training, not separable per shard)")

    def __init__(
        self,
        batch_size: int = 64,
        order: str | None = None,
        dynamics: Mapping[int, Sequence[int]] | np.ndarray | None = None,
        model_factory: Callable[[], nn.Module] | None = None,
        epochs: int = 8,
        lr: float = 1e-3,
        optimizer: str = "adam",
        max_retain: int | None = 5000,
        correct_threshold: float = 1.0,
    ) -> None:
        super().__init__(batch_size=batch_size, order=order)
        if isinstance(epochs, bool) or int(epochs) < 2:
            raise InvalidConfigError(f"epochs must be an integer >= 2 (events need two presentations), got {epochs!r}")
        if not float(lr) > 0:
            raise InvalidConfigError(f"lr must be > 0, got {lr!r}")
        if not 0.0 < float(correct_threshold) <= 1.0:
            raise InvalidConfigError(f"correct_threshold must be in (0, 1], got {correct_threshold!r}")
        self.dynamics = dynamics
        self.model_factory = model_factory
        self.epochs = int(epochs)
        self.lr = float(lr)
        self.optimizer = optimizer
        self.max_retain = max_retain
        self.correct_threshold = float(correct_threshold)

    # ------------------------------------------------------------------ dynamics
    def _given(self, forget: IdDataset, dynamics: Any) -> list[np.ndarray]:
        ids = forget.ids
        if isinstance(dynamics, Mapping):
            missing = [int(i) for i in ids if int(i) not in dynamics and str(int(i)) not in dynamics]
            if missing:
                raise InvalidDataError(f"dynamics has no record for forget id(s) {missing[:20]}")
            rows = [np.asarray(dynamics[int(i)] if int(i) in dynamics else dynamics[str(int(i))]).reshape(-1) for i in ids]
        else:
            arr = np.asarray(dynamics)
            if arr.ndim != 2 or arr.shape[0] != len(ids):
                raise InvalidDataError(
                    f"dynamics array must be [n_forget={len(ids)}, T] with rows in ascending forget-id order, got {arr.shape}"
                )
            rows = list(arr)
        for i, r in zip(ids, rows):
            if r.size == 0 or not np.all(np.isin(r, (0, 1, True, False))):
                raise InvalidDataError(f"dynamics of id {int(i)} must be a non-empty 0/1 sequence, got {r.tolist()[:10]}")
        return rows

    def _replay(self, model: nn.Module, forget: IdDataset, task: Task, seed: int, context: dict[str, Any]) -> tuple[list[np.ndarray], str]:
        factory = context.get("model_factory") or self.model_factory
        retain = context.get("retain")
        retain = None if retain is None else as_id_dataset(retain).sorted()
        if retain is not None and self.max_retain is not None and len(retain) > self.max_retain:
            keep = np.sort(np.random.default_rng(seed).choice(len(retain), int(self.max_retain), replace=False))
            retain = retain.subset(retain.ids[keep])
        data = union_with_ids(forget, retain)
        seed_everything(seed)
        if factory is not None:
            proxy = factory().to(model_device(model))
            source = "replayed proxy training (fresh model from model_factory)"
        else:
            proxy = copy.deepcopy(model)
            source = "replayed proxy training (copy of the model, fine-tuned)"
        source += f", {self.epochs} epochs on {'forget + retain' if retain is not None and len(retain) else 'forget only'}"
        for p in proxy.parameters():
            p.requires_grad_(True)
        opt = make_optimizer(self.optimizer, list(proxy.parameters()), self.lr)
        device = model_device(proxy)
        row_of = forget.row_of()
        history = np.zeros((len(forget), self.epochs), dtype=np.int8)
        loader = make_loader(data, task.collate, batch_size=self.batch_size, shuffle=True, seed=seed)
        proxy.train()
        with torch.enable_grad():
            for epoch in range(self.epochs):
                for batch in loader:
                    batch = batch.to(device)
                    out = task.forward(proxy, batch.data)
                    correct = (out.sample_accuracy() >= self.correct_threshold - 1e-9).cpu().numpy()
                    for i, c in zip(batch.ids.tolist(), correct):
                        r = row_of.get(i)
                        if r is not None:
                            history[r, epoch] = c
                    loss = out.sample_loss().mean()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
        return list(history), source

    def score(self, model: nn.Module, forget: IdDataset, task: Task, seed: int, **context: Any) -> np.ndarray:
        scores, _ = self._score_info(model, forget, task, seed, context)
        return scores

    def _score_info(self, model: nn.Module, forget: IdDataset, task: Task, seed: int, context: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
        dynamics = context.get("dynamics")
        if dynamics is None:
            dynamics = self.dynamics
        if dynamics is not None:
            rows, source = self._given(forget, dynamics), "given"
        else:
            rows, source = self._replay(model, forget, task, seed, context)
        t_max = max(len(r) for r in rows)
        scores = np.zeros(len(rows))
        never = []
        for j, r in enumerate(rows):
            events, learned = count_forgetting_events(r[None, :])
            scores[j] = float(events[0]) if learned[0] else float(t_max)
            if not learned[0]:
                never.append(int(forget.ids[j]))
        return scores, {"dynamics": source, "never_learned": never, "presentations": t_max}

    def _select(self, model: nn.Module, forget: IdDataset, task: Task, budget: int, seed: int, **context: Any) -> Coreset:
        scores, info = self._score_info(model, forget, task, seed, context)
        coreset = self.coreset_from_scores(forget.ids, scores, budget)
        coreset.info.update(info)
        return coreset
