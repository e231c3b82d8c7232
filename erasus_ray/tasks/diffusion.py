"""Adapter for class-conditional ``diffusers`` UNets: a loss-only noise-prediction objective under the model's own
scheduler, with the null class of classifier-free guidance.

Items are ``(x, y)``: ``x`` an image ``[C, H, W]`` in the model's value range (``[-1, 1]`` for the digits recipe),
``y`` its class. A sample's objective is the DDPM noise-prediction error (Ho et al., NeurIPS 2020, eq. 14)

    ``mean_d || eps_d - eps_theta(x_t_d, t_d, y) ||^2``,  ``x_t_d = scheduler.add_noise(x, eps_d, t_d)``,

over ``draws`` (timestep, noise) pairs drawn from a generator keyed by ``(seed, sample id)``, as in
:class:`~erasus_ray.tasks.denoising.DenoisingTask`: a sample is scored with the same draws every time, for every model
compared. ``timesteps=[...]`` fixes the timesteps instead (one draw each, noise still keyed by id): the loss at fixed
timesteps that membership attacks on diffusion models read (Carlini et al., USENIX Security 2023; SecMI, Duan et
al., ICML 2023), so ``mia_loss_auc`` on such a task is that attack.

Classifier-free guidance (Ho & Salimans 2022) is part of the recipe: the model has one class embedding more than
there are classes, the last one (``null_class``) meaning "no condition", and training drops a label to it with
probability ``label_dropout`` (:meth:`DiffusionTask.training_task`; training from scratch also draws fresh
(timestep, noise) pairs every step). Hence the ``guidance`` capability: :meth:`DiffusionTask.noised` (a batch's noised
inputs), :meth:`DiffusionTask.predict_noise` under any class or the null class, and :meth:`DiffusionTask.sample`
(seeded DDIM with a guidance scale). Features (``features`` capability) are the mid-block's output averaged over
positions and draws. There are no logits: el2n, margin and other logit readers refuse this task.

Given a ``judge`` (a classifier of generated images), the task's metric suite adds the judged generation metrics of
:mod:`erasus_ray.evaluation.diffusion`.

``diffusers`` is imported only when a diffusers model or scheduler is at hand, so the package works without it.
A prompt-conditioned (Stable-Diffusion shaped) model is the subclass :class:`~erasus_ray.tasks.prompt_diffusion.
PromptDiffusionTask`; it reuses everything here through three hooks (:meth:`DiffusionTask.condition_kwargs`,
:meth:`DiffusionTask.denoiser`, :meth:`DiffusionTask.decode`). A bare ``UNet2DConditionModel`` is refused with an
error that says how to wrap it with its text encoder.

Example:
    >>> task = get_task("auto", unet)              # a class-conditional diffusers UNet2DModel
    >>> loader = make_loader(as_id_dataset(images), task.collate, batch_size=32)
    >>> losses = task.per_sample_loss(unet, next(iter(loader)).data)   # [32], same draws every time
    >>> x0 = task.sample(unet, torch.tensor([3] * 16), seed=0)          # 16 generated "3"s

Cost: one forward pass over ``B * draws`` noised inputs per batch; sampling, ``steps`` guided forwards (two each).
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.data import default_collate

from erasus_ray.checks import check_int, check_real
from erasus_ray.errors import InvalidConfigError, InvalidDataError, TaskMismatchError
from erasus_ray.tasks.base import TaskOutput
from erasus_ray.tasks.capabilities import Capability as C
from erasus_ray.tasks.denoising import DenoisingTask, _noise_prediction, sample_generator
from erasus_ray.tasks.registry import register_task

#: The loss-based suite every diffusion task runs; a task with a judge adds :data:`GENERATION_METRICS`.
LOSS_METRICS = ("forget_loss", "retain_loss", "test_loss", "mia_loss_auc")
#: Judged generation metrics (registered in :mod:`erasus_ray.evaluation.diffusion`).
GENERATION_METRICS = ("erased_generation_rate", "retained_generation_acc", "retained_frechet")
#: diffusers names cross-attention ``attn2`` inside transformer blocks (``attn1`` is self-attention).
CROSS_ATTENTION = "attn2"


def is_diffusers_unet(model: nn.Module) -> bool:
    """Whether ``model`` is a diffusers ``UNet2DModel`` / ``UNet2DConditionModel`` (diffusers is imported only for a
    model that comes from it)."""
    if not type(model).__module__.startswith("diffusers"):
        return False
    import diffusers

    return isinstance(model, (diffusers.UNet2DModel, diffusers.UNet2DConditionModel))


def default_scheduler(num_train_timesteps: int = 1000) -> Any:
    """The DDPM scheduler of the recipe (linear betas 1e-4 .. 0.02, epsilon prediction)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=num_train_timesteps)


def _check_scheduler(scheduler: Any) -> Any:
    missing = [a for a in ("add_noise", "alphas_cumprod", "config") if not hasattr(scheduler, a)]
    if missing:
        raise TaskMismatchError(f"scheduler: {type(scheduler).__name__} lacks {missing}; the diffusion task needs a "
                                "diffusers noise scheduler with add_noise and alphas_cumprod (e.g. DDPMScheduler)")
    kind = scheduler.config.get("prediction_type", "epsilon")
    if kind != "epsilon":
        raise TaskMismatchError(f"scheduler: prediction_type={kind!r}; the diffusion task's objective is noise "
                                "prediction, so it needs prediction_type='epsilon'")
    return scheduler


@register_task("diffusion")
class DiffusionTask(DenoisingTask):
    """Noise prediction for a class-conditional diffusers UNet, under its scheduler, with a null class for guidance.

    ``task="auto"`` picks it for diffusers ``UNet2DModel`` (and recognises ``UNet2DConditionModel`` to refuse it);
    :meth:`from_model` reads the number of class embeddings from the model.

    Args:
        scheduler: a diffusers noise scheduler with ``add_noise`` and ``alphas_cumprod`` and epsilon prediction
            (default: ``DDPMScheduler(1000)``).
        num_class_embeds: the model's class embeddings (``model.config.num_class_embeds``); None for an unconditional
            model (labels are then data only: no guidance, no class-erasure method).
        null_class: the embedding meaning "no condition" (default: the last one, ``num_class_embeds - 1``).
        draws: (timestep, noise) pairs per sample when ``timesteps`` is None.
        timesteps: fixed timesteps, one draw each (a membership attack's loss at fixed t).
        seed: keys every draw together with the sample id.
        label_dropout: probability a training draw's label becomes the null class (recipe: 0.1).
        judge: a classifier of generated images (``judge(x) -> logits``), for the judged generation metrics.
        sample_steps, guidance_scale: the DDIM sampler's steps and classifier-free guidance scale ``w`` (the noise is
            ``eps_null + w (eps_c - eps_null)``).
        eval_samples: images generated per class by the judged metrics.
        feature_layer: the module whose output, averaged over positions and draws, is a sample's feature.
    """

    capabilities = frozenset({C.INDEPENDENT, C.LABELS, C.FEATURES, C.GUIDANCE})
    # above the generic denoising adapter, which also accepts a UNet2DModel
    match_priority = 30
    default_metrics = LOSS_METRICS
    #: Avg.Gap averages rates only (points): the Frechet distance is in judge-feature units, so it is shown, not averaged
    gap_metrics = ("mia_loss_auc", "erased_generation_rate", "retained_generation_acc")
    display_metrics = ("forget_loss", "test_loss", "mia_loss_auc") + GENERATION_METRICS
    eval_batch_size = 64

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return is_diffusers_unet(model)

    @classmethod
    def from_model(cls, model: nn.Module, **kwargs: Any) -> "DiffusionTask":
        """The adapter for ``model``: its class embeddings; a prompt-conditioned model gets the prompt adapter, a bare
        prompt-conditioned UNet (no text encoder to condition it) is refused."""
        for subclass in cls.__subclasses__():  # a more specific diffusion adapter (the prompt one) that takes it
            if subclass.matches(model):
                return subclass.from_model(model, **kwargs)
        config = getattr(model, "config", {})
        if type(model).__name__ == "UNet2DConditionModel":
            raise TaskMismatchError(
                "model: a bare UNet2DConditionModel cannot be conditioned without its text encoder and tokenizer; wrap "
                "it as PromptDiffusionModel(unet, text_encoder, tokenizer, scheduler, class_prompts=...) or "
                "PromptDiffusionModel.from_pipeline(pipe) (erasus_ray.tasks.prompt_diffusion)")
        kwargs.setdefault("num_class_embeds", config.get("num_class_embeds"))
        return cls(**kwargs)

    def __init__(self, scheduler: Any = None, *, num_class_embeds: int | None = None, null_class: int | None = None,
                 draws: int = 4, timesteps: Sequence[int] | None = None, seed: int = 0, label_dropout: float = 0.1,
                 judge: nn.Module | None = None, sample_steps: int = 25, guidance_scale: float = 2.0,
                 eval_samples: int = 64, feature_layer: str = "mid_block", label_arg: str = "class_labels") -> None:
        self.scheduler = _check_scheduler(default_scheduler() if scheduler is None else scheduler)
        self.num_timesteps = int(self.scheduler.config.num_train_timesteps)
        self.alphas_cumprod = torch.as_tensor(self.scheduler.alphas_cumprod).float()
        self.timesteps = self._check_timesteps(timesteps)
        self.draws = len(self.timesteps) if self.timesteps is not None else check_int("draws", draws, low=1)
        self.seed = int(seed)
        self.num_class_embeds = None if num_class_embeds is None else check_int("num_class_embeds", num_class_embeds, low=2)
        self.null_class = self._check_null_class(null_class)
        self.label_dropout = check_real("label_dropout", label_dropout, low=0.0, high=1.0)
        self.judge = judge
        self.sample_steps = check_int("sample_steps", sample_steps, low=1)
        self.guidance_scale = check_real("guidance_scale", guidance_scale, low=0.0)
        self.eval_samples = check_int("eval_samples", eval_samples, low=1)
        self.feature_layer = feature_layer
        self.label_arg = label_arg
        #: training from scratch draws afresh from the global RNG (see training_task)
        self.fresh_draws = False
        if judge is not None:  # the suite follows what this instance can measure
            self.default_metrics = LOSS_METRICS + GENERATION_METRICS

    def at_timesteps(self, timesteps: Sequence[int], seed: int | None = None) -> "DiffusionTask":
        """A copy that scores every sample at the fixed ``timesteps`` (noise keyed by id and ``seed``, default this
        task's): the loss a membership attack on a diffusion model reads (see the module docstring)."""
        fixed = copy.copy(self)
        fixed.seed = self.seed if seed is None else int(seed)
        fixed.timesteps = self._check_timesteps(timesteps)
        fixed.draws, fixed.fresh_draws = len(fixed.timesteps), False
        return fixed

    def _check_timesteps(self, timesteps: Sequence[int] | None) -> torch.Tensor | None:
        if timesteps is None:
            return None
        t = torch.as_tensor(list(timesteps), dtype=torch.long)
        if t.numel() == 0 or int(t.min()) < 0 or int(t.max()) >= self.num_timesteps:
            raise InvalidConfigError(f"timesteps must be a non-empty list in [0, {self.num_timesteps}), got {timesteps}")
        return t

    def _check_null_class(self, null_class: int | None) -> int | None:
        if self.num_class_embeds is None:
            if null_class is not None:
                raise InvalidConfigError("null_class needs num_class_embeds (a class-conditional model)")
            return None
        if null_class is None:
            return self.num_class_embeds - 1
        return check_int("null_class", null_class, low=0, high=self.num_class_embeds - 1)

    # --- the contract -------------------------------------------------------------------------------------
    @property
    def conditional(self) -> bool:
        """Whether the model takes a class condition (and has a null class for guidance)."""
        return self.null_class is not None

    @property
    def num_classes(self) -> int | None:
        """Classes a sample may have: every class embedding but the null one."""
        return None if self.num_class_embeds is None else self.num_class_embeds - 1

    def training_task(self) -> "DiffusionTask":
        """A copy that draws one fresh (timestep, noise) pair per sample and step from the global RNG (seeded by the
        training recipe) and drops labels to the null class with probability ``label_dropout``: the DDPM training
        objective with classifier-free guidance dropout."""
        train = copy.copy(self)
        train.fresh_draws, train.draws, train.timesteps = True, 1, None
        return train

    def collate(self, items: list[Any], ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Stack ``(x, y)`` items; draw each sample's (timestep, noise) pairs from its id's generator (afresh in a
        training task) and the per-draw condition (the label, or the null class under training dropout)."""
        if not isinstance(items[0], (tuple, list)) or len(items[0]) < 2:
            raise TaskMismatchError("diffusion items must be (image, class) pairs")
        cols = default_collate(items)
        x, y = cols[0], torch.as_tensor(cols[1]).long().reshape(-1)
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim < 2:
            raise TaskMismatchError("diffusion items must be (image [C, H, W] float tensor, class) pairs")
        self._check_labels(y)
        if self.fresh_draws:
            t = torch.randint(0, self.num_timesteps, (len(items), self.draws))
            noise = torch.randn((len(items), self.draws, *x.shape[1:]), dtype=x.dtype)
        else:
            t, noise = self.keyed_draws(len(items), ids, x.shape[1:], x.dtype)
        return {"x": x, "t": t, "noise": noise, "y": y, "cond": self._conditions(y, t.shape)}

    def _check_labels(self, y: torch.Tensor) -> None:
        if self.num_classes is None or not y.numel():
            return
        if int(y.min()) < 0 or int(y.max()) >= self.num_classes:
            raise InvalidDataError(f"class labels range over [{int(y.min())}, {int(y.max())}] but the model has "
                                   f"{self.num_classes} classes (embedding {self.null_class} is the null class)")

    def _conditions(self, y: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        cond = y[:, None].expand(shape).clone()
        if self.fresh_draws and self.conditional and self.label_dropout > 0:
            cond[torch.rand(shape) < self.label_dropout] = self.null_class
        return cond

    def _draws(self, key: int, shape: torch.Size, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self.timesteps is None:
            return super()._draws(key, shape, dtype)
        noise = torch.randn((self.draws, *shape), generator=sample_generator(self.seed, key), dtype=dtype)
        return self.timesteps.clone(), noise

    def noised(self, data: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_t [B*D, C, H, W], t [B*D])``: every draw's noised input, by the scheduler's ``add_noise``."""
        x, t, noise = data["x"], data["t"], data["noise"]
        x_rep = x.unsqueeze(1).expand(noise.shape).reshape(-1, *x.shape[1:])
        t_flat = t.reshape(-1)
        # on a shallow copy: diffusers' add_noise caches its tables on the scheduler (``self.alphas_cumprod =
        # ....to(device)``); inside a torch.func transform (per-sample gradients) that cached a functorch wrapper on
        # the task's scheduler, which no longer pickles (the Ray scoring pool refused the task) or outlives its transform
        return copy.copy(self.scheduler).add_noise(x_rep, noise.reshape(x_rep.shape), t_flat), t_flat

    def model_inputs(self, data: Any) -> tuple[tuple, dict]:
        x_t, t = self.noised(data)
        return (x_t, t), self.condition_kwargs(data["cond"].reshape(-1)) if self.conditional else {}

    def condition_kwargs(self, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The keyword arguments that condition the model on ``labels`` (classes or the null class): the class
        embedding's index here; a prompt adapter gives the prompts' token ids."""
        return {self.label_arg: labels}

    def denoiser(self, model: nn.Module) -> nn.Module:
        """The noise-predicting network inside ``model`` (the model itself here; a pipeline's ``unet``): the module
        whose parameters concept-erasure methods choose from, named relative to it."""
        return model

    def cross_attention_modules(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """``(name, module)`` of every cross-attention block of the denoiser (diffusers ``attn2``, with ``to_k`` /
        ``to_v`` projections of the text states), names relative to :meth:`denoiser`; none in a class-conditional
        UNet2DModel."""
        return [(name, m) for name, m in self.denoiser(model).named_modules()
                if name.split(".")[-1] == CROSS_ATTENTION]

    def decode(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Generated samples as images (identity in pixel space; a latent model decodes with its VAE)."""
        return x

    def labels_of(self, data: Any) -> torch.Tensor:
        return data["y"]

    def relabel(self, data: Any, labels: torch.Tensor) -> Any:
        labels = labels.to(data["y"].device).long()
        self._check_labels(labels)
        return {**data, "y": labels, "cond": labels[:, None].expand(data["t"].shape).clone()}

    def _forward_with_features(self, model: nn.Module, args: tuple, kwargs: dict, data: Any) -> TaskOutput:
        captured: list[torch.Tensor] = []
        layer = model.get_submodule(self.feature_layer)
        handle = layer.register_forward_hook(lambda m, i, o: captured.append(_noise_prediction(o)))
        try:
            raw = model(*args, **kwargs)
        finally:
            handle.remove()
        feats = captured[-1].flatten(2).mean(2)  # [B*D, channels]: averaged over positions
        return self.read_output(raw, data, features=feats.reshape(self.batch_size(data), -1, feats.shape[1]).mean(1))

    # --- guidance -----------------------------------------------------------------------------------------
    def require_conditional(self, what: str) -> None:
        """Raise :class:`TaskMismatchError` naming ``what`` unless the model is class-conditional with a null class."""
        if not self.conditional:
            raise TaskMismatchError(f"{what} needs a class-conditional model with a null class for guidance; this "
                                    "diffusion task's model has no class embeddings (num_class_embeds=None)")

    def check_class(self, value: Any, argument: str) -> int:
        """``value`` as a class index of the model (not the null class), else :class:`InvalidConfigError` naming
        ``argument``."""
        self.require_conditional(argument)
        if isinstance(value, str):
            raise InvalidConfigError(f"{argument}: got the prompt {value!r}, but this model is class-conditional "
                                     f"(no text encoder); give a class index in [0, {self.num_classes})")
        return check_int(argument, value, low=0, high=self.num_classes - 1)  # type: ignore[operator]

    def draw_labels(self, data: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[B*D]`` the class of every draw (each sample's label, repeated over its draws)."""
        return data["y"].unsqueeze(1).expand(data["t"].shape).reshape(-1)

    def null_labels(self, like: torch.Tensor) -> torch.Tensor:
        """The null class, shaped like ``like`` (the unconditional prediction of classifier-free guidance)."""
        self.require_conditional("the unconditional (null-class) prediction")
        return torch.full_like(like, self.null_class)

    def predict_noise(self, model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``eps_model(x_t, t, labels)``, the predicted noise (labels may be the null class)."""
        self.require_conditional("a class-conditional noise prediction")
        return _noise_prediction(model(x_t, t, **self.condition_kwargs(labels.to(x_t.device))))

    def draw_loss(self, pred: torch.Tensor, target: torch.Tensor, data: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[B]`` per-sample mean squared error between a ``[B*D, ...]`` prediction and target, over its draws."""
        return (pred.float() - target.float()).pow(2).reshape(self.batch_size(data), -1).mean(1)

    def with_images(self, data: dict[str, torch.Tensor], x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """``data`` with its images and classes replaced, keeping its draws (another image under the same noise)."""
        labels = labels.to(data["y"].device).long()
        return {**data, "x": x.to(data["x"]), "y": labels, "cond": labels[:, None].expand(data["t"].shape).clone()}

    @torch.no_grad()
    def sample(self, model: nn.Module, labels: torch.Tensor, *, steps: int | None = None,
               guidance_scale: float | None = None, seed: int = 0, batch_size: int = 256) -> torch.Tensor:
        """Generate one image per entry of ``labels`` by DDIM (Song et al., ICLR 2021; eta 0) with classifier-free
        guidance ``eps_null + w (eps_c - eps_null)``; the initial noise comes from a generator seeded by ``seed``.

        Cost: ``steps`` forward passes over ``2 * len(labels)`` inputs."""
        return self.decode(model, self.partial_sample(model, labels, steps=steps, guidance_scale=guidance_scale,
                                                      seed=seed, batch_size=batch_size)[0])

    @torch.no_grad()
    def partial_sample(self, model: nn.Module, labels: torch.Tensor, *, stop_after: int | None = None,
                       steps: int | None = None, guidance_scale: float | None = None, seed: int = 0,
                       batch_size: int = 256) -> tuple[torch.Tensor, int]:
        """:meth:`sample`, stopped after ``stop_after`` of its ``steps`` DDIM steps (None: all of them): ``(x_t, t)``,
        the partially denoised images and the training timestep they are at (0 once sampling is complete).
        ESD's data-free ``x_t`` comes from here."""
        from diffusers import DDIMScheduler

        self.require_conditional("class-conditional sampling")
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        for c in labels.unique().tolist():
            self.check_class(c, "labels")
        ddim = DDIMScheduler.from_config(self.scheduler.config)
        ddim.set_timesteps(steps or self.sample_steps)
        timesteps = ddim.timesteps if stop_after is None else ddim.timesteps[:stop_after]
        t_next = 0 if stop_after is None or stop_after >= len(ddim.timesteps) else int(ddim.timesteps[stop_after])
        w = self.guidance_scale if guidance_scale is None else float(guidance_scale)
        size = model.config.sample_size
        shape = (model.config.in_channels, *((size, size) if isinstance(size, int) else size))
        device = next(model.parameters()).device
        x = torch.randn((len(labels), *shape), generator=torch.Generator().manual_seed(int(seed))).to(device)
        was_training = model.training
        model.eval()
        try:
            chunks = [self._ddim(model, ddim, timesteps, x[i:i + batch_size], labels[i:i + batch_size].to(device), w)
                      for i in range(0, len(labels), batch_size)]
        finally:
            model.train(was_training)
        return (torch.cat(chunks) if chunks else x), t_next

    def _ddim(self, model: nn.Module, ddim: Any, timesteps: torch.Tensor, x: torch.Tensor, labels: torch.Tensor,
              w: float) -> torch.Tensor:
        both = torch.cat([labels, self.null_labels(labels)])
        for t in timesteps:
            eps_c, eps_u = self.predict_noise(model, torch.cat([x, x]), t.expand(2 * len(x)).to(x.device), both).chunk(2)
            x = ddim.step(eps_u + w * (eps_c - eps_u), t, x).prev_sample
        return x

    def __repr__(self) -> str:
        fixed = f", timesteps={self.timesteps.tolist()}" if self.timesteps is not None else ""
        return (f"DiffusionTask(num_timesteps={self.num_timesteps}, draws={self.draws}{fixed}, seed={self.seed}, "
                f"null_class={self.null_class})")
