"""Loading a job's ``model:`` and saving the unlearned model in the same format.

* a Hugging Face model folder (``config.json`` inside): the class its config's ``architectures`` names,
  ``from_pretrained(path, local_files_only=True)`` (never the hub); saved back with ``save_pretrained`` (and the
  tokenizer beside it, when there is one);
* a torch checkpoint file plus ``factory: package.module:function``: the factory builds the module (with
  ``factory_args``), the checkpoint's state dict (the file itself, or its ``state_dict`` / ``model_state_dict`` entry)
  is loaded strictly, read with ``weights_only=True`` (no pickled code runs); saved back as a state dict;
* ``factory:`` alone: the factory returns the trained model; saved as a state dict.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from erasus_ray.errors import InvalidConfigError
from erasus_ray.jobs._imports import load_callable
from erasus_ray.utils.atomic import atomic_torch_save


@dataclass
class LoadedModel:
    """The model, its tokenizer (or None) and the format it came in (``"hf"``, ``"checkpoint"``, ``"factory"``)."""

    model: nn.Module
    tokenizer: Any
    kind: str


def is_hf_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def load_model(spec: dict[str, Any], base_dir: Path) -> LoadedModel:
    """Build the model ``spec`` (a job's checked ``model:`` section) describes; errors name ``model.<key>``."""
    path = None if spec.get("path") is None else base_dir / str(spec["path"])
    factory = spec.get("factory")
    if path is not None and not path.exists():
        raise InvalidConfigError(f"model.path: {path} does not exist")
    if path is not None and is_hf_folder(path):
        if factory is not None:
            raise InvalidConfigError("model.factory: a Hugging Face folder builds its own model; drop factory")
        model = _load_hf(path)
        return LoadedModel(model, _load_tokenizer(spec.get("tokenizer"), base_dir, default=path), "hf")
    if factory is None:
        what = "a folder without config.json" if path is not None and path.is_dir() else "a checkpoint file"
        raise InvalidConfigError(f"model.factory: {what} needs factory: 'package.module:function' to build the module")
    make = load_callable(factory, "model.factory", base_dir)
    model = make(**spec.get("factory_args", {}))
    if not isinstance(model, nn.Module):
        raise InvalidConfigError(f"model.factory: {factory!r} returned {type(model).__name__}, not a torch.nn.Module")
    if path is not None:
        _load_checkpoint(model, path)
    tokenizer = _load_tokenizer(spec.get("tokenizer"), base_dir, default=None)
    return LoadedModel(model, tokenizer, "checkpoint" if path is not None else "factory")


def _load_hf(path: Path) -> nn.Module:
    import transformers

    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    archs = getattr(config, "architectures", None) or []
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None:
        raise InvalidConfigError(f"model.path: {path}/config.json names no architecture transformers knows ({archs}); "
                                 "save the model with save_pretrained from its model class")
    return cls.from_pretrained(path, local_files_only=True)


def _load_tokenizer(given: Any, base_dir: Path, default: Path | None) -> Any:
    if given is None and default is None:
        return None
    folder = base_dir / str(given) if given is not None else default
    if given is not None and not folder.is_dir():
        raise InvalidConfigError(f"model.tokenizer: {folder} is not a folder")
    has_files = any(folder.glob("tokenizer*")) or (folder / "vocab.json").is_file()
    if not has_files:
        if given is not None:
            raise InvalidConfigError(f"model.tokenizer: no tokenizer files in {folder}")
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def _load_checkpoint(model: nn.Module, path: Path) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # not a torch file, or pickled objects beyond tensors
        raise InvalidConfigError(f"model.path: {path} is not a torch state-dict checkpoint readable with "
                                 f"weights_only=True: {type(err).__name__}: {err}") from None
    if isinstance(state, dict):
        state = state.get("state_dict", state.get("model_state_dict", state))
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise InvalidConfigError(f"model.path: {path} does not fit the module model.factory builds: {err}") from None


def save_model(loaded: LoadedModel, model: nn.Module, folder: Path) -> str:
    """Write ``model`` (the unlearned one) into ``folder`` in the input's format; returns the name written
    (``"model"`` folder for Hugging Face, ``"model.pt"`` otherwise)."""
    if loaded.kind == "hf":
        target = folder / "model"
        model.save_pretrained(target)
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(target)
        return "model"
    atomic_torch_save(model.state_dict(), folder / "model.pt")
    return "model.pt"
