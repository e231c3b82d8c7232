"""Adapter for denoising models (DDPM-style diffusion): a loss-only task whose objective draws timesteps and noise.

Items are ``(x, y)`` (``y`` an optional class condition) or ``x``. The model predicts the noise ``eps`` added to ``x``
at timestep ``t``: ``model(x_t, t[, class_labels=y])`` with ``x_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps`` under a
fixed linear beta schedule (Ho et al., NeurIPS 2020, "Denoising Diffusion Probabilistic Models", eq. 14). A sample's
objective is the mean squared error of the noise prediction, averaged over ``draws`` (timestep, noise) pairs.

The draws are part of the batch and keyed by sample id: :meth:`DenoisingTask.collate` receives the batch's ids (from
:func:`erasus_ray.data.make_loader`) and draws each sample's pairs from a generator seeded by ``(seed, id)``, so a
sample is scored with the same draws every time, whatever its batch, and a reference model and the model being
unlearned are compared on the same draws (NPO-style references cached by id stay meaningful).

The model returns the predicted noise as a tensor, a tuple whose first item is it, or an object with ``.sample``
(``diffusers`` ``UNet2DModel``; ``diffusers`` itself is never imported here).

Example:
    >>> task = DenoisingTask(draws=2, seed=0)
    >>> loader = make_loader(as_id_dataset(images), task.collate, batch_size=32)  # ids reach collate
    >>> losses = task.per_sample_loss(model, next(iter(loader)).data)          # [32], same draws every time

Cost: one forward pass over ``B * draws`` noised inputs per batch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import default_collate

from erasus_ray.checks import check_int, check_real
from erasus_ray.errors import TaskMismatchError
from erasus_ray.tasks.base import Task, TaskOutput, at_least_fp32, output_tensor
from erasus_ray.tasks.capabilities import Capability as C
from erasus_ray.tasks.registry import register_task

#: Class names of denoisers ``task="auto"`` recognises without a ``denoiser = True`` attribute.
_DENOISER_CLASSES = ("UNet2DModel",)

# A 64-bit odd constant (the golden ratio's fraction) spreads (seed, id) pairs over the generator's seed space.
_MIX = 0x9E3779B97F4A7C15


def sample_generator(seed: int, sample_id: int) -> torch.Generator:
    """A CPU generator keyed by ``(seed, sample_id)``: the same pair always yields the same stream."""
    return torch.Generator().manual_seed((int(seed) * _MIX + int(sample_id)) % (2**63 - 1))


def _noise_prediction(raw: Any) -> torch.Tensor:
    return output_tensor(raw, "sample", "denoising task expects the model to return the predicted noise")


@register_task("denoising")
class DenoisingTask(Task):
    """Denoising (noise-prediction) objective, loss-only: no logits, one per-sample MSE over seeded draws.

    ``task="auto"`` picks it for models that declare ``denoiser = True`` and for ``diffusers`` ``UNet2DModel``.

    Args:
        num_timesteps: length of the linear beta schedule (DDPM: 1000).
        beta_start, beta_end: the schedule's first and last beta.
        draws: (timestep, noise) pairs per sample; the objective is their mean (variance falls as ``1/draws``).
        seed: keys every draw together with the sample id.
        label_arg: keyword under which the class condition ``y`` reaches the model (``diffusers``: ``class_labels``).
    """

    capabilities = frozenset({C.INDEPENDENT})
    # above the classifier, which accepts every plain nn.Module
    match_priority = 20

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return getattr(model, "denoiser", False) is True or type(model).__name__ in _DENOISER_CLASSES

    def __init__(self, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02, draws: int = 4,
                 seed: int = 0, label_arg: str = "class_labels") -> None:
        self.num_timesteps = check_int("num_timesteps", num_timesteps, low=1)
        beta_start = check_real("beta_start", beta_start, low=0.0, high=1.0, low_open=True)
        beta_end = check_real("beta_end", beta_end, low=beta_start, high=1.0)
        self.draws = check_int("draws", draws, low=1)
        self.seed = int(seed)
        self.label_arg = label_arg
        betas = torch.linspace(beta_start, beta_end, self.num_timesteps, dtype=torch.float64)
        #: cumulative product of (1 - beta): the signal fraction sqrt(abar_t) of x_t
        self.alphas_cumprod = torch.cumprod(1.0 - betas, 0).float()

    def collate(self, items: list[Any], ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Stack ``x`` (and ``y``) and draw each sample's ``draws`` timesteps and noises from its id's generator.

        Without ``ids`` (a caller outside the id-carrying loaders) the row position keys the draws: reproducible for
        that batch, but not tied to the sample."""
        if isinstance(items[0], (tuple, list)):
            cols = default_collate(items)
            x, y = cols[0], torch.as_tensor(cols[1]).long() if len(cols) > 1 else None
        else:
            x, y = default_collate(items), None
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TaskMismatchError("denoising items must be float tensors x or (x, y) pairs")
        t, noise = self.keyed_draws(len(items), ids, x.shape[1:], x.dtype)
        data = {"x": x, "t": t, "noise": noise}
        if y is not None:
            data["y"] = y
        return data

    def keyed_draws(self, n: int, ids: Any, shape: torch.Size, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(t [n, draws], noise [n, draws, *shape])`` of a batch, each row from its sample id's own generator (row
        positions when no ids are given). One generator per sample is the price of draws that do not depend on the
        batch a sample lands in; it runs in the loader's collate, not in the model's forward or backward."""
        keys = range(n) if ids is None else [int(i) for i in ids]
        t, noise = zip(*(self._draws(k, shape, dtype) for k in keys))
        return torch.stack(t), torch.stack(noise)

    def _draws(self, key: int, shape: torch.Size, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        g = sample_generator(self.seed, key)
        t = torch.randint(0, self.num_timesteps, (self.draws,), generator=g)
        return t, torch.randn((self.draws, *shape), generator=g, dtype=dtype)

    def model_inputs(self, data: Any) -> tuple[tuple, dict]:
        # fixed-shape ops only (the same code runs under vmap): B samples x D draws -> B*D noised inputs
        x, t, noise = data["x"], data["t"], data["noise"]
        abar = self.alphas_cumprod.to(x.device)[t].to(x.dtype)  # [B, D]
        scale = abar.reshape(*abar.shape, *([1] * (x.ndim - 1)))
        x_t = scale.sqrt() * x.unsqueeze(1) + (1 - scale).sqrt() * noise
        kwargs = {}
        if "y" in data:
            kwargs[self.label_arg] = data["y"].unsqueeze(1).expand(t.shape).reshape(-1)
        return (x_t.reshape(-1, *x.shape[1:]), t.reshape(-1)), kwargs

    def batch_size(self, data: Any) -> int:
        return int(data["x"].shape[0])

    def read_output(self, raw: Any, data: Any, *, features: torch.Tensor | None = None) -> TaskOutput:
        pred = _noise_prediction(raw)
        expected = (data["noise"].shape[0] * data["noise"].shape[1], *data["noise"].shape[2:])
        if tuple(pred.shape) != expected:
            raise TaskMismatchError(
                f"denoising task expects a noise prediction of shape {expected} (batch x draws, *x.shape[1:]); "
                f"the model returned {tuple(pred.shape)}"
            )
        return TaskOutput(losses=self.dense_sample_loss(pred, data), batch_size=self.batch_size(data), features=features)

    def dense_sample_loss(self, raw: Any, data: Any) -> torch.Tensor:
        noise = data["noise"]
        pred = at_least_fp32(_noise_prediction(raw)).reshape(noise.shape)
        return (pred - noise).pow(2).reshape(noise.shape[0], -1).mean(1)

    def __repr__(self) -> str:
        return f"DenoisingTask(num_timesteps={self.num_timesteps}, draws={self.draws}, seed={self.seed})"
