"""A job whose data is read as a stream (``data.streaming: true``, or automatically when ``data.factory`` returns a
stream: a ``torch`` ``IterableDataset`` such as ``datasets.load_dataset(..., streaming=True)``): the forget, retain
and held-out sets are never held in memory whole.

The passes over the data (each reads it chunk by chunk, ``data.chunk_rows`` rows at a time; a ``data.factory`` is
called once per pass, so it should return a fresh stream each call - as ``load_dataset(..., streaming=True)`` or a
generator function does - in the same order):

1. **count** - the selections (``forget:``, ``heldout:``, ``retain:``) per chunk, by the id column; no model runs.
   Named ids absent from the whole stream, an empty forget set or no retain row fail here, before any forward pass.
2. **score** - one no-grad forward pass over the forget rows, keeping the top-``k`` by the selector's score
   (:func:`~erasus_ray.jobs.streaming.stream_top_k`): the coreset, by id. Streamable selectors: :data:`erasus_ray.jobs.config.STREAM_SELECTORS`.
3. **collect** - the coreset's rows, plus a seeded uniform sample (reservoir sampling, Vitter's algorithm R) of
   ``data.stream_sample`` retain rows and as many held-out rows: the retain steps are drawn from the stream through
   this sample, and the held-out sample is the controller's reference.
4. **measure the original** - one pass (:func:`verify_pass`): mean loss (and accuracy) over every forget, retain and
   held-out row (``metrics_before``), each forget row's id and loss (and right / wrong), and the distinct labels of
   the forget and retain rows; the target (``target:``) is resolved on the whole stream (:func:`stream_target`: a
   ``class`` target from every row's labels, not the coreset's).
5. **unlearn, judge the whole stream, grow** (:func:`unlearn_stream`) - :class:`~erasus_ray.ErasusUnlearner` on the
   coreset and the samples (its own closed loop sees the coreset), then one measuring pass of the unlearned model: the
   target is judged on every forget row's loss with the retain / held-out samples the unlearner's probe measures, and
   the utility guard against the original (:class:`StreamJudge`). While it fails, the target's failing ids outside
   the coreset (lowest loss first, at most the coreset's size) are read in one pass and the next round unlearns the
   grown coreset from the current model - at most ``data.stream_rounds`` rounds (default 3). ``verified`` is the
   last whole-stream verdict (and the unlearner's own guard); ``verification`` records each round, the coreset's
   growth, the final criteria and why it stopped (``verified: false`` with the reason when the rounds run out).

Memory: O(chunk_rows + k x 2^rounds + 2 x stream_sample) rows whatever the stream's length (``benchmarks/streaming``
measures the scoring passes), plus 12 bytes per forget row for its id and loss in the measuring passes (13 with a
classifier's right / wrong, 16 with a token task's fraction right; two measurements held at once: ~26-32 MB per
million forget rows) - the price of a verdict on every forget row rather than on the coreset.

Refused with an :class:`InvalidConfigError` naming the key, before any pass: a selector that needs every forget
sample at once (:data:`erasus_ray.jobs.config.STREAM_SELECTORS` lists those that do not), ``fraction: auto`` (the
adaptive coreset grows from the in-memory forget set: give ``k`` or a number; the stream's own closed loop grows it
from ``k``), and strategies that retrain from the retain set (:data:`erasus_ray.jobs.config.WHOLE_RETAIN_STRATEGIES`). Ids: unique within each chunk is checked; across chunks it is the data's promise
(a set of every id seen would grow with the stream).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from erasus_ray.errors import InvalidConfigError, InvalidDataError
from erasus_ray.jobs._imports import load_callable
from erasus_ray.jobs.config import UserJobConfig, check_streamable
from erasus_ray.jobs.rows import absent_ids_error, selection_ids, split_masks, table_ids
from erasus_ray.jobs.streaming import iter_id_batches, stream_top_k
from erasus_ray.jobs.tables import Table, _arrow_columns, _as_column, saved_dataset_files, source_kind
from erasus_ray.control import GrowthPlan
from erasus_ray.data import as_id_dataset
from erasus_ray.evaluation.stats import SetStats, set_stats
from erasus_ray.evaluation.verification import (ClassTarget, Criterion, Measurement, Probe, ResolvedTarget, Verdict,
                                                removed_classes_of, resolve_target, verification_record)
from erasus_ray.selectors import Coreset
from erasus_ray.tasks import Capability, Task
from erasus_ray.utils import model_device

DEFAULT_CHUNK_ROWS = 4096
DEFAULT_STREAM_SAMPLE = 2048
DEFAULT_STREAM_ROUNDS = 3
SPLITS = ("forget", "retain", "heldout")


def is_stream_source(made: Any) -> bool:
    """A factory's product that is read as a stream: an ``IterableDataset`` (``torch``'s, which ``datasets``'
    streaming datasets subclass) or any iterable that is not a table (a generator of row dicts)."""
    if isinstance(made, torch.utils.data.IterableDataset):
        return True
    tabular = isinstance(made, dict) or hasattr(made, "schema") or hasattr(made, "columns") or hasattr(made, "column_names")
    return hasattr(made, "__iter__") and not tabular


def wants_streaming(cfg: UserJobConfig) -> bool:
    """``data.streaming: true``, or a ``data.factory`` whose product is a stream (the factory is called once)."""
    flag = cfg.data.get("streaming")
    if flag is not None:
        return bool(flag)
    if cfg.data.get("factory") is None:
        return False
    return is_stream_source(_call_factory(cfg))


def _call_factory(cfg: UserJobConfig) -> Any:
    make = load_callable(cfg.data["factory"], "data.factory", cfg._base_dir)
    return make(**cfg.data.get("factory_args", {}))


# ----------------------------------------------------------------------------------------------------------------------
# chunks of the source
# ----------------------------------------------------------------------------------------------------------------------
def iter_chunks(cfg: UserJobConfig) -> Iterator[Table]:
    """The job's data as :class:`Table` chunks of at most ``data.chunk_rows`` rows, in the source's order."""
    rows = int(cfg.data.get("chunk_rows", DEFAULT_CHUNK_ROWS))
    if cfg.data.get("path") is not None:
        path = cfg.path(cfg.data["path"])
        kind = source_kind(path)
        if kind not in _CHUNKERS:
            raise InvalidConfigError(f"data.streaming: a {kind} file is read whole; stream Parquet, CSV, JSON Lines or "
                                     "a save_to_disk folder")
        for batch in _CHUNKERS[kind](path, cfg.data.get("split"), rows):
            if batch.num_rows:
                yield Table(_arrow_columns(_as_arrow_table(batch)), str(path))
        return
    yield from _row_chunks(_call_factory(cfg), rows, cfg.data["factory"])


def _as_arrow_table(batch: Any) -> Any:
    import pyarrow as pa

    return pa.Table.from_batches([batch])


def _parquet_batches(path: Path, split: str | None, rows: int) -> Iterator[Any]:
    import pyarrow.parquet as pq

    # pre_buffer=False: with pyarrow's default pre-buffering, Arrow's pool kept every column chunk read so far (measured:
    # 206 MiB allocated after 800k of 1M rows, vs 30 MiB flat without it)
    yield from pq.ParquetFile(path, pre_buffer=False).iter_batches(batch_size=rows)


def _csv_batches(path: Path, split: str | None, rows: int) -> Iterator[Any]:
    import pyarrow.csv as pcsv

    yield from pcsv.open_csv(path)  # blocks of ~1 MB: bounded, if not exactly `rows`


def _jsonl_batches(path: Path, split: str | None, rows: int) -> Iterator[Any]:
    import pyarrow.json as pjson

    yield from pjson.open_json(path)


def _saved_dataset_batches(path: Path, split: str | None, rows: int) -> Iterator[Any]:
    import json

    import pyarrow as pa

    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
        if split not in splits:
            raise InvalidConfigError(f"data.split: {path} holds splits {splits}; name one (got {split!r})")
        path = path / split
    for file in saved_dataset_files(path):
        with pa.memory_map(str(file)) as source:
            for batch in pa.ipc.open_stream(source):
                for start in range(0, batch.num_rows, rows):
                    yield batch.slice(start, rows)


_CHUNKERS: dict[str, Callable[[Path, str | None, int], Iterator[Any]]] = {
    "parquet": _parquet_batches, "csv": _csv_batches, "jsonl": _jsonl_batches, "saved_dataset": _saved_dataset_batches,
}


def _row_chunks(made: Any, rows: int, key: str) -> Iterator[Table]:
    """Chunks of a factory's product: a ``datasets`` stream through its batched ``iter``, any other iterable of row
    dicts gathered ``rows`` at a time; a table (mapping, DataFrame, Arrow) sliced."""
    if not is_stream_source(made):
        from erasus_ray.jobs.tables import table_from_factory

        table = table_from_factory(lambda: made, {}, key)
        for start in range(0, len(table), rows):
            yield Table({n: c[start:start + rows] for n, c in table.columns.items()}, key)
        return
    if hasattr(made, "iter") and hasattr(made, "column_names"):  # datasets.IterableDataset: columns per batch
        for batch in made.iter(batch_size=rows):
            yield Table({n: _as_column(v) for n, v in batch.items()}, key)
        return
    gathered: list[dict[str, Any]] = []
    for position, row in enumerate(made):
        if not isinstance(row, dict):
            raise InvalidDataError(f"data.factory: streamed row {position} is a {type(row).__name__}; yield dicts of "
                                   "columns (with the id column)")
        gathered.append(row)
        if len(gathered) == rows:
            yield _dict_rows_table(gathered, key)
            gathered = []
    if gathered:
        yield _dict_rows_table(gathered, key)


def _dict_rows_table(rows: list[dict[str, Any]], key: str) -> Table:
    return Table({n: _as_column([_plain(r[n]) for r in rows]) for n in rows[0]}, key)


def _plain(value: Any) -> Any:
    return value.tolist() if hasattr(value, "tolist") else value


# ----------------------------------------------------------------------------------------------------------------------
# rows and their split
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class StreamSplits:
    """What a pass saw of the selections: rows per split and the named ids found; :meth:`check` after the pass."""

    cfg: UserJobConfig
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    named: dict[str, np.ndarray] = field(default_factory=dict)
    found: dict[str, set[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key in ("forget", "heldout", "retain"):
            ids = selection_ids(self.cfg.data.get(key), f"data.{key}", self.cfg._base_dir)
            if ids is not None:
                self.named[key], self.found[key] = ids, set()

    def masks(self, chunk: Table, ids: np.ndarray) -> dict[str, np.ndarray]:
        forget, retain, heldout = split_masks(self.cfg.data, chunk, ids, self.cfg._base_dir, partial=True)
        out = {"forget": forget, "retain": retain, "heldout": heldout}
        for key, mask in out.items():
            self.counts[key] += int(mask.sum())
            if key in self.found:
                self.found[key].update(ids[mask].tolist())
        return out

    def check(self) -> None:
        for key, wanted in self.named.items():
            absent = np.setdiff1d(wanted, np.fromiter(self.found[key], dtype=np.int64, count=len(self.found[key])))
            if len(absent):
                raise absent_ids_error(absent, f"data.{key}")
        if not self.counts["forget"]:
            raise InvalidDataError(f"data.forget: {self.cfg.data['forget']!r} matches no row of the stream")
        if not self.counts["retain"]:
            raise InvalidDataError("data.retain: no row is left to retain")


def iter_rows(cfg: UserJobConfig, splits: StreamSplits, build: Callable[[Table, np.ndarray], Dataset] | None
              ) -> Iterator[tuple[str, int, Any]]:
    """``(split, id, item)`` for every selected row of the stream, in its order; ``build=None``: no items (the
    count pass), ``item`` None."""
    for chunk in iter_chunks(cfg):
        ids = table_ids(chunk, cfg.data["id_column"])
        masks = splits.masks(chunk, ids)
        dataset = None if build is None else build(chunk, ids)
        for name in SPLITS:
            for row in np.flatnonzero(masks[name]):
                yield name, int(ids[row]), None if dataset is None else dataset[int(row)]


class Reservoir:
    """A uniform sample of ``size`` items of a stream (algorithm R), seeded: the same stream gives the same sample."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seen = size, 0
        self.rng = np.random.default_rng(seed)
        self.ids: list[int] = []
        self.items: list[Any] = []

    def offer(self, sample_id: int, item: Any) -> None:
        self.seen += 1
        if len(self.items) < self.size:
            self.ids.append(sample_id)
            self.items.append(item)
            return
        slot = int(self.rng.integers(self.seen))
        if slot < self.size:
            self.ids[slot], self.items[slot] = sample_id, item


class ItemDataset(Dataset):
    """Items kept in memory with their ids (read by :func:`erasus_ray.data.as_id_dataset`)."""

    def __init__(self, ids: list[int], items: list[Any]) -> None:
        order = np.argsort(np.asarray(ids, dtype=np.int64), kind="stable")  # id order: independent of stream order
        self.ids = np.asarray(ids, dtype=np.int64)[order]
        self.items = [items[i] for i in order]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, row: int) -> Any:
        return self.items[row]


# ----------------------------------------------------------------------------------------------------------------------
# the passes
# ----------------------------------------------------------------------------------------------------------------------
def count_pass(cfg: UserJobConfig) -> StreamSplits:
    """Pass 1: rows per split, the selections checked over the whole stream; no items are built, no model runs."""
    splits = StreamSplits(cfg)
    for _ in iter_rows(cfg, splits, None):
        pass
    splits.check()
    return splits


def coreset_size(cfg: UserJobConfig, n_forget: int, k: int | None) -> int:
    size = k if k is not None else max(1, int(round(float(cfg.fraction) * n_forget)))
    if size > n_forget:
        raise InvalidConfigError(f"k: {size} is larger than the forget set ({n_forget} rows)")
    return size


def stream_coreset(cfg: UserJobConfig, model: nn.Module, task: Task, build: Callable[[Table, np.ndarray], Dataset], *,
                   selector: str | None = None, k: int | None = None, batch_size: int = 256) -> tuple[Coreset, StreamSplits]:
    """Passes 1 and 2: count, then the top-``k`` forget rows by the selector's score, in one bounded-memory pass."""
    selector = selector or cfg.selector
    score, order = check_streamable(cfg, selector, k if k is not None else cfg.k)
    splits = count_pass(cfg)
    size = coreset_size(cfg, splits.counts["forget"], k if k is not None else cfg.k)
    forget_rows = ((i, item) for name, i, item in iter_rows(cfg, StreamSplits(cfg), build) if name == "forget")
    coreset = stream_top_k(model, forget_rows, task, size, score=score, order=order, batch_size=batch_size, ids="pairs")
    coreset.selector = selector if selector != "default" else "loss"
    return coreset, splits


def collect_pass(cfg: UserJobConfig, build: Callable[[Table, np.ndarray], Dataset], coreset_ids: np.ndarray
                 ) -> tuple[ItemDataset, ItemDataset, ItemDataset | None]:
    """Pass 3: the coreset's items, and seeded reservoir samples of retain and held-out items."""
    size = int(cfg.data.get("stream_sample", DEFAULT_STREAM_SAMPLE))
    samples = {"retain": Reservoir(size, cfg.seed), "heldout": Reservoir(size, cfg.seed + 1)}
    chosen = _gather(cfg, build, coreset_ids, samples)
    heldout = samples["heldout"]
    return (chosen, ItemDataset(samples["retain"].ids, samples["retain"].items),
            ItemDataset(heldout.ids, heldout.items) if heldout.items else None)


def _gather(cfg: UserJobConfig, build: Callable[[Table, np.ndarray], Dataset], forget_ids: np.ndarray,
            samples: dict[str, Reservoir]) -> ItemDataset:
    """One pass: the forget rows named by ``forget_ids``, and every other selected row offered to its split's sample."""
    wanted = set(np.asarray(forget_ids).tolist())
    chosen_ids, chosen_items = [], []
    for name, sample_id, item in iter_rows(cfg, StreamSplits(cfg), build):
        if name == "forget":
            if sample_id in wanted:
                chosen_ids.append(sample_id)
                chosen_items.append(item)
        elif name in samples:
            samples[name].offer(sample_id, item)
    return ItemDataset(chosen_ids, chosen_items)


def grow_coreset(cfg: UserJobConfig, build: Callable[[Table, np.ndarray], Dataset], coreset: ItemDataset,
                 new_ids: np.ndarray) -> ItemDataset:
    """The coreset with the forget rows ``new_ids`` added, read in one pass (a closed-loop round's failing rows)."""
    added = _gather(cfg, build, new_ids, {})
    return ItemDataset(coreset.ids.tolist() + added.ids.tolist(), coreset.items + added.items)


@dataclass
class StreamMeasure:
    """One measuring pass (:func:`verify_pass`): per model, mean loss / accuracy over every forget, retain and held-out
    row (``means``, the ``metrics_before`` / ``metrics_after`` keys) and per-row stats of every forget row
    (``forget``: ids, losses and, with logits, correctness); ``labels``: the distinct class labels of the forget and
    retain rows (empty where the task has none) - what resolving a ``class`` target on the whole stream needs."""

    means: dict[str, dict[str, float]]
    forget: dict[str, SetStats]
    labels: dict[str, np.ndarray]


@torch.no_grad()
def verify_pass(cfg: UserJobConfig, build: Callable[[Table, np.ndarray], Dataset], task: Task,
                models: dict[str, nn.Module], batch_size: int = 256) -> StreamMeasure:
    """Pass 5 (and one per closed-loop round): per model, mean loss (and accuracy) on every forget, retain and
    held-out (``test_*``) row, and each forget row's loss - one pass for all models.

    Memory: one batch per split, plus per model and forget row its id (int64) and loss (float32): 12 bytes a row, 13
    with a classifier's right/wrong (bool), 16 with a token task's fraction right (float32) - 12-16 MB per million
    forget rows, the price of judging the target on the whole forget stream (a mean would not give the per-row
    losses a held-out target's AUC / KS test and the failing ids need)."""
    prefix = {"forget": "forget", "retain": "retain", "heldout": "test"}
    sums: dict[str, dict[str, list[float]]] = {m: {} for m in models}
    rows = {m: _ForgetRows() for m in models}
    labels: dict[str, set] = {"forget": set(), "retain": set()}
    states = {m: model.training for m, model in models.items()}
    for model in models.values():
        model.eval()
    try:
        for name, batch in _split_batches(iter_rows(cfg, StreamSplits(cfg), build), task, batch_size):
            _note_labels(labels, name, task, batch)
            for label, model in models.items():
                out = task.forward(model, batch.to(model_device(model)).data)
                acc = out.sample_accuracy().float().sum() if task.provides(Capability.LOGITS) else None
                _add(sums[label], prefix[name], len(batch), float(out.sample_loss().float().sum()), acc)
                if name == "forget":
                    rows[label].add(batch.ids, out)
    finally:
        for label, model in models.items():
            model.train(states[label])
    means = {m: {k: v[0] / v[1] for k, v in s.items()} for m, s in sums.items()}
    found = {k: np.asarray(sorted(v)) for k, v in labels.items()}
    return StreamMeasure(means, {m: r.stats() for m, r in rows.items()}, found)


def _note_labels(labels: dict[str, set], name: str, task: Task, batch: Any) -> None:
    if name in labels:
        found = task.labels_of(batch.data)
        if found is not None:
            labels[name].update(np.unique(found.cpu().numpy()).tolist())


class _ForgetRows:
    """Per-row stats of the forget rows, gathered batch by batch (see :func:`verify_pass` for the bytes per row)."""

    def __init__(self) -> None:
        self.ids: list[np.ndarray] = []
        self.loss: list[np.ndarray] = []
        self.correct: list[np.ndarray] = []

    def add(self, ids: torch.Tensor, out: Any) -> None:
        self.ids.append(ids.cpu().numpy().astype(np.int64))
        self.loss.append(out.sample_loss().float().cpu().numpy())
        if out.has_logits:
            right = out.sample_accuracy().float().cpu().numpy()
            one_unit = out.logits.shape[0] == out.batch_size  # a classifier: right or wrong, one byte
            self.correct.append(right.astype(bool) if one_unit else right)

    def stats(self) -> SetStats:
        """The rows in stream order (as :func:`~erasus_ray.evaluation.stats.set_stats` keeps data order); each
        column's batches are released as it is joined, so the peak is the rows twice over, not more."""
        ids, loss, correct = (_join_released(parts) for parts in (self.ids, self.loss, self.correct))
        return SetStats(np.zeros(0, np.int64) if ids is None else ids, np.zeros(0, np.float32) if loss is None else loss,
                        correct)


def _join_released(parts: list[np.ndarray]) -> np.ndarray | None:
    joined = np.concatenate(parts) if parts else None
    parts.clear()
    return joined


def _add(sums: dict[str, list[float]], prefix: str, n: int, loss: float, acc: Any) -> None:
    for key, value in ((f"{prefix}_loss", loss), (f"{prefix}_acc", acc)):
        if value is not None:
            entry = sums.setdefault(key, [0.0, 0])
            entry[0] += float(value)
            entry[1] += n


def _split_batches(rows: Iterable[tuple[str, int, Any]], task: Task, batch_size: int) -> Iterator[tuple[str, Any]]:
    """Batches of one split each, from interleaved ``(split, id, item)`` rows: one pending batch per split."""
    pending: dict[str, list[tuple[int, Any]]] = {name: [] for name in SPLITS}
    for name, sample_id, item in rows:
        pending[name].append((sample_id, item))
        if len(pending[name]) == batch_size:
            yield name, next(iter_id_batches(pending[name], task.collate, batch_size=batch_size, ids="pairs"))
            pending[name] = []
    for name, rest in pending.items():
        if rest:
            yield name, next(iter_id_batches(rest, task.collate, batch_size=batch_size, ids="pairs"))


# ----------------------------------------------------------------------------------------------------------------------
# the target on the whole forget stream, and the closed loop over it
# ----------------------------------------------------------------------------------------------------------------------
def stream_target(cfg: UserJobConfig, task: Task, labels: dict[str, np.ndarray], forget: ItemDataset,
                  retain: ItemDataset, heldout: ItemDataset | None) -> ResolvedTarget:
    """``cfg.target`` resolved for the whole forget stream. ``class`` / ``auto`` decide "a forget set of whole
    classes" from the distinct labels of every forget and retain row (``labels``, from :func:`verify_pass`), not from
    the coreset and the retain sample, which could make one class of several the target; everything else as
    :func:`~erasus_ray.evaluation.verification.resolve_target` (a named target that cannot be measured raises
    :class:`InvalidConfigError`)."""
    target = cfg.target
    stand_in = dict(task=task, forget=as_id_dataset(forget), heldout=None if heldout is None else as_id_dataset(heldout),
                    gold=None)
    if isinstance(target, str) and target in ("class", "auto"):
        classes = removed_classes_of(labels["forget"], labels["retain"]) if task.provides(Capability.LOGITS) else None
        if classes is not None:
            return ResolvedTarget(ClassTarget(classes), f"every forget row of the stream is in class(es) "
                                                        f"{classes.tolist()}, which no retain row has")
        # the stream's labels said "not whole classes": resolve without retain rows, so the coreset's cannot say otherwise
        return resolve_target(target, retain=None, **stand_in)
    return resolve_target(target, retain=as_id_dataset(retain), **stand_in)


def stream_rounds(cfg: UserJobConfig) -> int:
    """``data.stream_rounds``: closed-loop rounds over the stream after the first unlearning (default 3)."""
    return int(cfg.data.get("stream_rounds", DEFAULT_STREAM_ROUNDS))


@dataclass
class StreamRun:
    """:func:`unlearn_stream`'s outcome: the last round's :class:`~erasus_ray.UnlearningResult` (its ``verification``
    replaced by the whole-stream one), the final coreset, and the mean metrics of every row before / after."""

    result: Any
    coreset: ItemDataset
    before: dict[str, float]
    after: dict[str, float]


def unlearn_stream(cfg: UserJobConfig, build: Callable[[Table, np.ndarray], Dataset], task: Task, model: nn.Module,
                   sets: tuple[ItemDataset, ItemDataset, ItemDataset | None],
                   make_unlearner: Callable[[nn.Module, Any], Any]) -> StreamRun:
    """Passes 4 and 5 as a closed loop over the whole forget stream.

    A measuring pass of the original model (:func:`verify_pass`: per-row forget losses, the labels), the target
    resolved on the stream (:func:`stream_target`); then per round: unlearn the coreset (``make_unlearner(model,
    target)``, an :class:`~erasus_ray.ErasusUnlearner` whose own closed loop sees the coreset), measure every forget
    row (one pass) and judge the target on the whole stream with the utility guard against the original model; while
    it fails, the target's failing ids outside the coreset (lowest loss first, at most the coreset's size: it at most
    doubles per round, as the in-memory adaptive coreset does) are read in one pass and the next round continues
    from the current model on the grown coreset - at most ``data.stream_rounds`` rounds (default 3), then the verdict
    is reported as it stands. Memory: the coreset's rows (at most ``k x 2^rounds``), the samples, and the per-row
    forget stats of two measurements (:func:`verify_pass`). Cost: per round one unlearning run and one pass (two
    when it grows)."""
    forget, retain, heldout = sets
    first = verify_pass(cfg, build, task, {"before": model})
    resolved = stream_target(cfg, task, first.labels, forget, retain, heldout)
    unlearner = make_unlearner(model, resolved.target or cfg.target)
    judge = StreamJudge(resolved, unlearner.control, task, retain, heldout, cfg.seed)
    judge.begin(first.forget["before"], model)
    rounds, history, runs = stream_rounds(cfg), [], []
    for round_no in range(rounds + 1):
        result = unlearner.fit(forget, retain, heldout_data=heldout)
        runs.append(verification_record(result.verification))  # the record only: an earlier round's model is let go
        after = verify_pass(cfg, build, task, {"after": result.model})
        verdict = judge.judge(after.forget["after"], result.model)
        step = {"round": round_no, "coreset": len(forget), **verdict.summary}
        history.append(step)
        new = judge.next_ids(verdict, forget.ids) if round_no < rounds else np.zeros(0, np.int64)
        step["added"] = int(len(new))
        if not len(new):
            break
        forget = grow_coreset(cfg, build, forget, new)
        unlearner = make_unlearner(result.model, resolved.target or cfg.target)  # continues from the current model
    result.verification = judge.record(history, runs, rounds)
    return StreamRun(result, forget, first.means["before"], after.means["after"])


@dataclass
class Judged:
    """One whole-stream judgement: the measurement, the target's verdict (None: no measurable target) and the guard."""

    measurement: Measurement
    verdict: Verdict | None
    guard: list[Criterion]

    @property
    def guard_ok(self) -> bool:
        return all(c.passed for c in self.guard)

    @property
    def passed(self) -> bool | None:
        return None if self.verdict is None else bool(self.verdict.passed and self.guard_ok)

    @property
    def summary(self) -> dict[str, Any]:
        if self.verdict is None:
            return {"passed": None}
        failing = self.verdict.failing() + [f"guard {c.name}={c.value:.4g} outside [{c.low}, {c.high}]"
                                            for c in self.guard if not c.passed]
        return {"passed": self.passed, "violation": self.verdict.violation, "guard_ok": self.guard_ok,
                **({"failing": "; ".join(failing)} if failing else {})}


class StreamJudge:
    """The target judged on every forget row of the stream (per-row stats from :func:`verify_pass`) with the retain /
    held-out samples the unlearner's own probe measures (same sizes and seed: ``control.retain_samples`` /
    ``heldout_samples`` of the reservoir samples, so all held-out rows when they fit), and the utility guard against
    the original model's measurement. Cost per judgement: forward passes over those two samples (in memory)."""

    def __init__(self, resolved: ResolvedTarget, control: Any, task: Task, retain: ItemDataset,
                 heldout: ItemDataset | None, seed: int) -> None:
        self.resolved, self.target, self.guard, self.task = resolved, resolved.target, control.guard, task
        as_ids = lambda d: None if d is None else as_id_dataset(d)  # noqa: E731
        self.probe = Probe(task, None, as_ids(retain), as_ids(heldout), retain_samples=control.retain_samples,
                           heldout_samples=control.heldout_samples, seed=seed)
        if self.target is not None:  # as resolve_target wires the unlearner's probe: a target that measures the
            self.probe.model_metrics = self.target.measure_model  # model itself is measured at every judgement
        self.last: Judged | None = None

    def measure(self, forget: SetStats, model: nn.Module) -> Measurement:
        run = lambda d: None if d is None else set_stats(model, self.task, d, self.probe.batch_size)  # noqa: E731
        extra = {} if self.probe.model_metrics is None else self.probe.model_metrics(model)
        return Measurement(forget, run(self.probe.retain), run(self.probe.heldout), extra)

    def begin(self, forget: SetStats, original: nn.Module) -> None:
        """Measure the original model (the guard's reference)."""
        self.original = self.measure(forget, original) if self.target is not None else None

    def judge(self, forget: SetStats, model: nn.Module) -> Judged:
        if self.target is None:
            self.last = Judged(Measurement(forget, None, None), None, [])
            return self.last
        m = self.measure(forget, model)
        self.target.prepare(self.original, None)  # the unlearner's loop prepared it on its coreset's measurement
        self.last = Judged(m, self.target.verdict(m), self.guard.check(m, self.original, self.target))
        return self.last

    def next_ids(self, judged: Judged, coreset_ids: np.ndarray) -> np.ndarray:
        """Failing forget ids outside the coreset, at most its size, lowest loss first (the target's order); none
        once the target holds, without a target, or when the guard failed (more forget rows would not restore
        utility)."""
        if judged.verdict is None or judged.passed or not judged.guard_ok:
            return np.zeros(0, np.int64)
        return GrowthPlan(None).pick(self.target.failing_ids(judged.measurement), coreset_ids, limit=len(coreset_ids))

    def record(self, history: list[dict[str, Any]], runs: list[dict[str, Any]], rounds: int) -> dict[str, Any]:
        """The job's verification (``results.json`` ``verification``; ``verified`` is its ``passed``): the last
        whole-stream verdict and guard, each round, and ``runs`` (each round's unlearner verification record)."""
        last = self.last
        common = {"why": self.resolved.why, "scope": f"all {len(last.measurement.forget)} forget rows of the stream",
                  "rounds": history, "coreset_growth": [h["coreset"] for h in history], "coreset_runs": runs}
        if last.verdict is None:
            return {"mode": "unverified", "target": None, "passed": None, "stopped": self.resolved.why, **common}
        own_guard = runs[-1].get("guard_ok")
        passed = bool(last.passed and own_guard is not False)
        return {"mode": "stream_closed_loop", **self.target.describe(), **last.verdict.to_dict(), "passed": passed,
                "guard": [c.to_dict() for c in last.guard], "guard_ok": last.guard_ok, "unlearner_guard_ok": own_guard,
                "stopped": self._stopped(history, own_guard, rounds), **common}

    def _stopped(self, history: list[dict[str, Any]], own_guard: bool | None, rounds: int) -> str:
        last, end = self.last, history[-1]
        if not last.guard_ok:
            return (f"not verified: the utility guard failed on the whole-stream measurement in round {end['round']} "
                    f"({end['failing']}); a larger coreset would not restore utility")
        if last.passed and own_guard is False:
            return "not verified: the target holds on the whole stream, but the unlearner's own utility guard failed"
        if last.passed:
            return f"verified on every forget row of the stream in round {end['round']}"
        if end["round"] == rounds:
            return (f"not verified: {rounds} closed-loop round(s) over the stream spent (data.stream_rounds); "
                    f"still failing: {end['failing']}")
        return f"not verified: no failing forget row is outside the coreset; still failing: {end['failing']}"
