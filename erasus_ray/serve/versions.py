"""Published model versions of the deletion service: ``v<N>.pt`` state dicts and one ``versions.json`` index that
names the served version. Publishing writes the weights file first, then replaces the index (both atomic: temp file,
``fsync``, ``os.replace``), so a reader sees either the old version or the new one, never a half-written one.

Readers (the ``/predict`` replicas, any process) compare the index's modification time and reload only when it
changed. Version 0 is the original model. Each version records its parent, the dataset ids forgotten so far (the
worker keeps them out of later retain sets), the requests it serves and their verification.

Cost: publish = one ``torch.save`` + a small JSON write; :meth:`ModelVersions.current` = one ``stat`` (+ one JSON
read when the index changed).
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from erasus_ray.errors import InvalidConfigError
from erasus_ray.utils.atomic import atomic_torch_save, atomic_write_text

INDEX = "versions.json"


class ModelVersions:
    """The versions in ``folder``; ``factory()`` builds an untrained model of the served architecture."""

    def __init__(self, folder: str | Path, factory: Callable[[], nn.Module]) -> None:
        self.folder = Path(folder)
        self.factory = factory
        self._lock = threading.Lock()
        self._cached: tuple[tuple[int, int], dict[str, Any]] | None = None

    def initialise(self, original: nn.Module) -> None:
        """Make ``original`` version 0 unless versions already exist (a restart serves its last published version)."""
        if (self.folder / INDEX).exists():
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(original.state_dict(), self.folder / "v0.pt")
        self._write({"current": 0, "versions": {"0": _version_meta(None, [], [], None)}})

    def index(self) -> dict[str, Any]:
        path = self.folder / INDEX
        try:
            stat = path.stat()
            mtime = (stat.st_ino, stat.st_mtime_ns)  # os.replace gives a new inode: a change is seen even within one tick
        except FileNotFoundError:
            raise InvalidConfigError(f"state_dir {self.folder}: no published model (versions.json missing)") from None
        if self._cached is None or self._cached[0] != mtime:
            self._cached = (mtime, json.loads(path.read_text()))
        return self._cached[1]

    @property
    def current(self) -> int:
        return int(self.index()["current"])

    def meta(self, version: int) -> dict[str, Any]:
        return self.index()["versions"][str(version)]

    def load(self, version: int) -> nn.Module:
        """A fresh model holding version ``version``'s weights (a copy: nothing else shares it)."""
        model = self.factory()
        model.load_state_dict(torch.load(self.folder / f"v{version}.pt", map_location="cpu", weights_only=True))
        return model.eval()

    def publish(self, model: nn.Module, *, parent: int, forgotten_ids: Iterable[int], request_ids: Iterable[str],
                verification: dict[str, Any] | None) -> int:
        """Publish ``model`` as the next version, served from then on. ``parent``: the version it was unlearned from;
        if another version was published or rolled back to meanwhile, :class:`InvalidConfigError` and nothing is
        served (the caller's run started from a version no longer served)."""
        with self._lock:
            index = self.index()
            if int(index["current"]) != parent:
                raise InvalidConfigError(f"parent: version {parent} is no longer served (now {index['current']})")
            version = max(int(v) for v in index["versions"]) + 1
            atomic_torch_save(model.state_dict(), self.folder / f"v{version}.pt")
            versions = {**index["versions"], str(version): _version_meta(parent, forgotten_ids, request_ids, verification)}
            self._write({"current": version, "versions": versions})
            return version

    def lineage(self) -> list[int]:
        """The served version and its ancestors back to 0: the versions whose deletions the served model carries (a
        rolled-back version is off this chain)."""
        versions, chain = self.index()["versions"], [self.current]
        while versions[str(chain[-1])]["parent"] is not None:
            chain.append(int(versions[str(chain[-1])]["parent"]))
        return chain

    def rollback(self) -> int:
        """Serve the current version's parent again (an operator's decision); returns it."""
        with self._lock:
            index = self.index()
            parent = index["versions"][str(index["current"])]["parent"]
            if parent is None:
                raise InvalidConfigError("version 0 (the original model) has no previous version to roll back to")
            self._write({**index, "current": int(parent), "rolled_back_from": int(index["current"])})
            return int(parent)

    def _write(self, index: dict[str, Any]) -> None:
        atomic_write_text(self.folder / INDEX, json.dumps(index, indent=1))
        self._cached = None


def _version_meta(parent: int | None, forgotten_ids: Iterable[int], request_ids: Iterable[str],
                  verification: dict[str, Any] | None) -> dict[str, Any]:
    return {"parent": parent, "published_at": time.time(), "forgotten_ids": sorted(int(i) for i in forgotten_ids),
            "request_ids": list(request_ids), "verification": verification}


class ServedModel:
    """The model a replica answers with: reloads when the published version changes (between calls, never mid-call:
    a call keeps the model object it started with)."""

    def __init__(self, versions: ModelVersions) -> None:
        self.versions = versions
        self._lock = threading.Lock()
        self._loaded: tuple[int, nn.Module] | None = None

    def get(self) -> tuple[int, nn.Module]:
        version = self.versions.current
        with self._lock:
            if self._loaded is None or self._loaded[0] != version:
                self._loaded = (version, self.versions.load(version))
            return self._loaded
