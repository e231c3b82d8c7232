"""Atomic file writes: a reader, or a process killed mid-write, sees the old file or the new one, whole.

Every file erasus-ray writes (results, models, plots, leaderboards, caches of trained models) goes through
:func:`atomic_open`: the bytes go to a temp file in the target's folder (same file system, so the rename is atomic),
are flushed and ``fsync``-ed, and the temp file is then ``os.replace``-d onto the target and the folder ``fsync``-ed.
A SIGKILL or power loss before the replace leaves the old file untouched (and at most a ``.<name>.*.tmp`` beside
it); after it, the new file is complete. Cost: one ``fsync`` of the file and one of its folder per write.

This module imports nothing heavy (no torch), so a crash-test child can load it alone.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import IO, Any, Iterator


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (POSIX); folders cannot be opened this way on Windows."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", *, encoding: str | None = None,
                newline: str | None = None) -> Iterator[IO[Any]]:
    """Open ``path`` for writing (``mode`` ``"w"`` or ``"wb"``) so that it appears only whole, on a clean exit.

    On an exception inside the block the temp file is removed and ``path`` keeps its old content. The new file gets
    the default permissions of a newly created file (``0o666`` less the umask), as ``open(path, "w")`` would.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode must be 'w' or 'wb', got {mode!r}")
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    if mode == "w" and encoding is None:
        encoding = "utf-8"
    try:
        with os.fdopen(fd, mode, encoding=encoding, newline=newline) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_folder(target.parent)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """``Path(path).write_text(text)``, atomically."""
    with atomic_open(path, "w", encoding=encoding) as fh:
        fh.write(text)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """``Path(path).write_bytes(data)``, atomically."""
    with atomic_open(path, "wb") as fh:
        fh.write(data)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)``, atomically (model weights, checkpoints, cached trained models)."""
    import torch

    with atomic_open(path, "wb") as fh:
        torch.save(obj, fh)


def atomic_savefig(fig: Any, path: str | os.PathLike, **kwargs: Any) -> None:
    """``fig.savefig(path, **kwargs)``, atomically; the format comes from the suffix, as savefig infers it."""
    kwargs.setdefault("format", Path(path).suffix.lstrip(".").lower() or "png")
    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, **kwargs)


def remove_durably(path: str | os.PathLike) -> None:
    """Delete ``path`` if present and make the deletion durable: the first step of publishing outputs that
    depend on each other (see :meth:`erasus_ray.unlearner.UnlearningResult.save`)."""
    target = Path(path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(target)
        _fsync_folder(target.parent)
