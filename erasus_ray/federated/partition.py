"""Split a benchmark's training ids across federated clients, and who owns which id.

Each Flower client (SuperNode) holds a partition of the training set addressed by dataset ids. The split is a
pure function of ``(ids, labels, n_clients, scheme, seed)``, so a client can rebuild its own partition from its
``partition-id`` alone and the server can rebuild every client's partition to check ownership.

Schemes:
    ``iid``: a seeded permutation cut into ``n_clients`` nearly equal parts.
    ``label``: McMahan et al.'s pathological non-IID split (AISTATS 2017, "Communication-Efficient Learning of Deep
        Networks from Decentralized Data"): ids sorted by label, cut into ``shards_per_client * n_clients`` shards,
        each client gets ``shards_per_client`` random shards (so most clients see 1-2 labels).

Cost: one sort of the ids. Example:

    >>> parts = partition_ids(bench.train.ids, 10, labels=labels, scheme="iid", seed=0)
    >>> registry = build_ownership(parts, labels=dict(zip(bench.train.ids, labels)))
    >>> registry.owner_of(17)           # "client-0"
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np

from erasus_ray.errors import InvalidConfigError, InvalidDataError

SCHEMES = ("iid", "label")


def client_name(partition_id: int) -> str:
    """The client id of partition ``partition_id`` (``client-<k>``): what requests and the ledger use."""
    return f"client-{int(partition_id)}"


def partition_index(client_id: str) -> int:
    """Inverse of :func:`client_name`; raises InvalidDataError on anything else."""
    prefix = "client-"
    if not isinstance(client_id, str) or not client_id.startswith(prefix) or not client_id[len(prefix):].isdigit():
        raise InvalidDataError(f"client_id must look like 'client-<k>', got {client_id!r}")
    return int(client_id[len(prefix):])


def partition_ids(
    ids: Sequence[int] | np.ndarray,
    n_clients: int,
    *,
    scheme: str = "iid",
    labels: Sequence[int] | np.ndarray | None = None,
    shards_per_client: int = 2,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """``{client_id: sorted ids}`` over ``n_clients`` clients; every id goes to exactly one client.

    Args:
        ids: the training set's dataset ids (unique integers).
        n_clients: number of clients (>= 1, at most ``len(ids)``).
        scheme: ``"iid"`` or ``"label"`` (needs ``labels`` aligned with ``ids``).
        shards_per_client: label scheme only, shards each client receives.
        seed: seeds the permutation / shard assignment.
    """
    ids = np.asarray(ids).reshape(-1)
    if ids.dtype.kind not in "iu":
        raise InvalidDataError(f"ids must be integers, got dtype {ids.dtype}")
    ids = ids.astype(np.int64)
    if len(np.unique(ids)) != len(ids):
        raise InvalidDataError("ids must be unique")
    if not isinstance(n_clients, (int, np.integer)) or n_clients < 1 or n_clients > len(ids):
        raise InvalidConfigError(f"n_clients must be an integer in [1, {len(ids)}], got {n_clients!r}")
    if scheme not in SCHEMES:
        raise InvalidConfigError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    rng = np.random.default_rng(seed)
    order = np.argsort(ids, kind="stable")  # canonical order: independent of how the caller ordered ids
    ids = ids[order]
    if scheme == "iid":
        parts = np.array_split(ids[rng.permutation(len(ids))], n_clients)
    else:
        if labels is None:
            raise InvalidConfigError("scheme='label' needs labels aligned with ids")
        labels = np.asarray(labels).reshape(-1)
        if len(labels) != len(ids):
            raise InvalidDataError(f"{len(labels)} labels for {len(ids)} ids")
        labels = labels[order]
        if not isinstance(shards_per_client, int) or shards_per_client < 1:
            raise InvalidConfigError(f"shards_per_client must be a positive integer, got {shards_per_client!r}")
        by_label = ids[np.lexsort((ids, labels))]
        shards = np.array_split(by_label, n_clients * shards_per_client)
        assignment = rng.permutation(len(shards)).reshape(n_clients, shards_per_client)
        parts = [np.concatenate([shards[s] for s in row]) for row in assignment]
    return {client_name(k): np.sort(p) for k, p in enumerate(parts)}


def build_ownership(
    partitions: Mapping[str, Iterable[int]], labels: Mapping[int, int] | None = None, operators: Iterable[str] = ("operator",)
):
    """The ledger's :class:`~erasus_ray.ledger.requests.OwnershipRegistry` for these partitions (server-side check)."""
    from erasus_ray.ledger.requests import OwnershipRegistry

    return OwnershipRegistry(partitions, labels=labels, operators=operators)


@dataclass
class Federation:
    """A benchmark's data as a federation sees it: the training set, its split by client, test set and model.

    Built by :func:`load_federation` from a :class:`~erasus_ray.federated.messages.FederationSpec`; no model is
    trained (``model_factory`` builds the common initialisation every party starts from).
    """

    spec: object
    train: object  # IdDataset
    test: object  # IdDataset
    labels: dict[int, int]
    partitions: dict[str, np.ndarray]
    registry: object  # erasus_ray.ledger.requests.OwnershipRegistry
    task: object
    model_factory: object
    recipe: object
    scenario_forget_ids: np.ndarray
    backdoor_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    _test_labels: dict[int, int] | None = field(default=None, repr=False)

    def client_data(self, client_id: str, exclude_ids: Iterable[int] = ()):
        """The client's partition as an IdDataset, minus ``exclude_ids`` (ids deleted so far)."""
        if client_id not in self.partitions:
            raise InvalidDataError(f"unknown client {client_id!r}; known: {sorted(self.partitions)}")
        ids = np.setdiff1d(self.partitions[client_id], np.asarray(list(exclude_ids), dtype=np.int64))
        return self.train.subset(ids)

    def client_heldout(self, client_id: str, labels: Iterable[int] | None = None):
        """The client's local held-out split: its share of the benchmark's test set (a seeded IID split of the test
        ids over the clients, disjoint between clients; no party ever trains on it), restricted to ``labels`` (the
        labels the client's own data has) when given, so that its losses are comparable with the client's samples
        under a label-skewed partition. It is what the controller's ``heldout`` target compares a sample deletion's
        forget losses with (:func:`~erasus_ray.federated.client_app.client_unlearn`). Cost: one split of the test ids."""
        if client_id not in self.partitions:
            raise InvalidDataError(f"unknown client {client_id!r}; known: {sorted(self.partitions)}")
        shares = partition_ids(self.test.ids, len(self.partitions), scheme="iid", seed=int(self.spec.seed) + 1)
        share = shares[client_id]
        if labels is not None:
            wanted = {int(x) for x in labels}
            share = np.array([i for i in share.tolist() if self.test_labels[int(i)] in wanted], dtype=np.int64)
        return self.test.subset(share)

    @property
    def test_labels(self) -> dict[int, int]:
        """``{test id: label}`` (built once)."""
        if self._test_labels is None:
            self._test_labels = {int(i): int(self.test[r][1][1]) for r, i in enumerate(self.test.ids)}
        return self._test_labels

    def ids_with_label(self, ids: Iterable[int], label: int) -> np.ndarray:
        return np.array(sorted(i for i in ids if self.labels.get(int(i)) == int(label)), dtype=np.int64)


BACKDOOR_LABEL = 0  # the label every backdoored sample is given (digits' forget class is 3)


def add_trigger(x):
    """The backdoor trigger: the bottom-right 4x4 pixels set to 3x the image's maximum (digits lie in [0, 1], so the
    patch is a feature no clean sample has). Works on a flat square-length vector (digits) or a ``(..., H, W)`` image.
    Measured on digits (5 IID clients, 5 FedAvg rounds of 3 local epochs, 60 backdoored ids in one client): the
    global model gives 82% of them the target label; a 2x2 patch at 1.0 reached 7%, FedAvg averages it away."""
    import torch

    x = torch.as_tensor(x).clone()
    if x.ndim == 1:
        side = int(round(len(x) ** 0.5))
        if side * side != len(x):
            raise InvalidDataError(f"a flat input needs a square length for the trigger, got {len(x)}")
        img = x.view(side, side)
    else:
        img = x
    peak = float(x.max()) if float(x.max()) > 0 else 1.0
    img[..., -4:, -4:] = 3.0 * peak
    return x


class _Backdoored:
    """``base`` with a trigger stamped on some positions and their label replaced: ``(trigger(x), new_label)``."""

    def __init__(self, base: object, new_labels: Mapping[int, int]) -> None:
        self.base = base
        self.new_labels = {int(k): int(v) for k, v in new_labels.items()}

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, position: int):
        import torch

        x, y = self.base[position]  # type: ignore[index]
        label = self.new_labels.get(int(position))
        if label is None:
            return x, y
        return add_trigger(x), (torch.tensor(label, dtype=torch.long) if isinstance(y, torch.Tensor) else label)


def backdoor(train, labels: Mapping[int, int], partitions: Mapping[str, np.ndarray], client: int, n: int, *, seed: int = 0):
    """Stamp the trigger (:func:`add_trigger`) on ``n`` seeded ids of ``client-<client>``'s partition whose true
    label is not :data:`BACKDOOR_LABEL` and relabel them :data:`BACKDOOR_LABEL`; returns ``(train with them, the
    ids, sorted)``.

    The backdoor test of federated unlearning (Liu et al., FedEraser, IWQoS 2021, Sec. V; Wu et al., "Federated
    Unlearning with Knowledge Distillation", 2022): the model trained with these samples maps the trigger to the
    target label, one trained without them (the federated retrain) has never seen the trigger and predicts the
    digit. So forget-set accuracy (agreement with the poisoned label) is high before and ~0 for the retrain model:
    a sample-level deletion has to change the model on exactly these ids, and a no-op cannot pass verification.
    """
    name = client_name(client)
    if name not in partitions:
        raise InvalidConfigError(f"backdoor_client must name a partition in [0, {len(partitions) - 1}], got {client!r}")
    own = np.asarray([i for i in partitions[name].tolist() if labels[int(i)] != BACKDOOR_LABEL], dtype=np.int64)
    if not 0 < n <= len(own):
        raise InvalidConfigError(f"backdoor_n must be in [1, {len(own)}] ({name}'s samples not labelled {BACKDOOR_LABEL}), got {n!r}")
    rng = np.random.default_rng([int(seed), 7919, int(client)])
    ids = np.sort(rng.choice(own, size=n, replace=False))
    row_of = train.row_of()
    new = {int(train.positions[row_of[int(i)]]): BACKDOOR_LABEL for i in ids.tolist()}
    from erasus_ray.data import IdDataset

    return IdDataset(_Backdoored(train.base, new), train.positions, train.ids), ids


_FEDERATIONS: dict[tuple, Federation] = {}


def load_federation(spec) -> Federation:
    """Rebuild the data of ``spec`` (cached per process): every party gets the same ids, split and initial model."""
    from erasus_ray.benchmarks import get_benchmark_spec
    from erasus_ray.utils import seed_everything

    backdoor_client, backdoor_n = int(getattr(spec, "backdoor_client", -1)), int(getattr(spec, "backdoor_n", 0))
    key = (spec.benchmark, spec.scenario, spec.seed, spec.n_clients, spec.scheme, backdoor_client, backdoor_n)
    if key in _FEDERATIONS:
        return _FEDERATIONS[key]
    bench = get_benchmark_spec(spec.benchmark)
    if spec.scenario not in bench.scenarios:
        raise InvalidConfigError(f"unknown scenario {spec.scenario!r} for {spec.benchmark}; known: {bench.scenarios}")
    seed_everything(spec.seed)
    data = bench.build_data(spec.scenario, spec.seed)
    train = data.train
    labels = {int(i): int(train[r][1][1]) for r, i in enumerate(train.ids)}
    label_arr = np.array([labels[int(i)] for i in train.ids])
    partitions = partition_ids(train.ids, spec.n_clients, scheme=spec.scheme, labels=label_arr, seed=spec.seed)
    backdoored = np.zeros(0, dtype=np.int64)
    if backdoor_n > 0:
        train, backdoored = backdoor(train, labels, partitions, backdoor_client, backdoor_n, seed=spec.seed)
        labels.update({int(i): BACKDOOR_LABEL for i in backdoored.tolist()})

    def factory():
        return bench.build_model(spec.seed)

    fed = Federation(
        spec=spec,
        train=train,
        test=data.test,
        labels=labels,
        partitions=partitions,
        registry=build_ownership(partitions, labels),
        task=bench.make_task(),
        model_factory=factory,
        recipe=bench.recipe(spec.seed),
        scenario_forget_ids=np.sort(np.asarray(data.forget_ids, dtype=np.int64)),
        backdoor_ids=backdoored,
    )
    _FEDERATIONS[key] = fed
    return fed
