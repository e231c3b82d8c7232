"""``digits_diffusion``: class erasure in a class-conditional diffusion model of scikit-learn's 8x8 digits.

The original model is a diffusers ``UNet2DModel`` (blocks of 32 and 64 channels, 11 class embeddings: 10 digits and
the null class of classifier-free guidance) trained from scratch with the DDPM objective and label dropout 0.1; the
gold model is the same recipe on the retain set (every digit but ``forget_class``). A judge classifier (the ``digits``
MLP, trained on the same training split) labels generated images: the task's judged metrics
(:mod:`erasus_ray.evaluation.diffusion`) measure the erased class's generation rate and the other classes' fidelity.
Data, split and scenarios are those of the ``digits`` benchmark, images scaled to ``[-1, 1]`` and shaped ``[1, 8, 8]``.

Example:
    >>> bench = load_benchmark("digits_diffusion")            # trained once, then cached under ERASUS_RAY_CACHE
    >>> generation_rate(bench.task, bench.original, 3)        # ~0.9: the model draws 3s
    >>> generation_rate(bench.task, bench.gold, 3)            # ~0: it never saw one

Cost (one thread): see ``benchmarks/diffusion/RESULTS.md`` for the measured training seconds of the two UNets and the
judge; nothing is downloaded.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
from torch import nn

from erasus_ray.benchmarks.base import cache_root
from erasus_ray.benchmarks.models import MLP
from erasus_ray.benchmarks.vision import ArrayDataset, DigitsBenchmark
from erasus_ray.data import IdDataset
from erasus_ray.evaluation.diffusion import generation_rate
from erasus_ray.tasks import ClassificationTask, Task
from erasus_ray.tasks.diffusion import DiffusionTask
from erasus_ray.tasks.prompt_diffusion import PromptDiffusionTask
from erasus_ray.training import TrainRecipe, train_model
from erasus_ray.utils.atomic import atomic_torch_save, atomic_write_text

#: The digits MLP's recipe, for the judge.
JUDGE_RECIPE = TrainRecipe(epochs=30, lr=1e-3, batch_size=64, optimizer="adam")


def digits_unet(num_classes: int = 10, channels: tuple[int, int] = (32, 64), groups: int = 8) -> nn.Module:
    """A class-conditional ``UNet2DModel`` for 1x8x8 images with ``num_classes + 1`` class embeddings (the last is
    the null class)."""
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=channels, layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       num_class_embeds=num_classes + 1, norm_num_groups=groups)


#: Digit names and prompt templates of the prompt-conditioned variant (``digits_prompt_diffusion``).
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PROMPT_TEMPLATES = ("a handwritten {}", "the digit {}", "a picture of a {}")
_SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")


def word_tokenizer(words: Any, max_length: int = 8) -> Any:
    """An SD-style tokenizer over a fixed vocabulary (whitespace words, ``<bos> ... <eos>``, padded with ``<pad>``)
    built here, offline: a ``transformers.PreTrainedTokenizerFast`` called exactly as SD calls CLIP's tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(dict.fromkeys([*_SPECIAL_TOKENS, *sorted(words)]))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A <eos>", special_tokens=[
        ("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>",
                                   eos_token="<eos>", model_max_length=max_length)


def digits_prompt_model(channels: tuple[int, int] = (32, 64), groups: int = 8, width: int = 32,
                        templates: Any = PROMPT_TEMPLATES) -> nn.Module:
    """A Stable-Diffusion-shaped model for 1x8x8 digits: ``UNet2DConditionModel`` (cross-attention in the first
    down block, the mid block and the last up block, ``cross_attention_dim=width``), a one-layer ``CLIPTextModel``
    of width ``width`` (random, frozen: it only has to tell the prompts apart), the word tokenizer over the
    templates' words, ``DDPMScheduler(1000)``, pixel space (no VAE); class ``c``'s prompts are the templates
    filled with ``DIGIT_NAMES[c]``."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from erasus_ray.tasks.prompt_diffusion import PromptDiffusionModel, prompts_from_templates

    prompts = prompts_from_templates(templates, DIGIT_NAMES)
    tokenizer = word_tokenizer({w for p in prompts for q in p for w in q.split()})
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                            num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
                            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id)
    unet = UNet2DConditionModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=channels,
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=width,
                                attention_head_dim=8, norm_num_groups=groups)
    return PromptDiffusionModel(unet, CLIPTextModel(config), tokenizer, DDPMScheduler(num_train_timesteps=1000),
                                class_prompts=prompts)


class ImageJudge(nn.Module):
    """A digits classifier of images in the diffusion model's range: ``[N, 1, 8, 8]`` in ``[-1, 1]`` -> logits."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(((x.clamp(-1, 1) + 1) / 2).flatten(1))


class DigitsDiffusionBenchmark(DigitsBenchmark):
    """Digits as ``[1, 8, 8]`` images in ``[-1, 1]``; a class-conditional UNet; a judge trained on the train split.

    Args:
        forget_class: the class to erase (scenario ``class``).
        epochs: training epochs of each UNet (23 optimizer steps each at batch 64).
        judge_samples: images per class generated by the judged metrics.
    """

    name = "digits_diffusion"
    task_class = DiffusionTask

    def __init__(self, forget_class: int = 3, test_size: float = 0.2, epochs: int = 20, judge_samples: int = 64,
                 **options: Any) -> None:
        # judge_samples is an evaluation setting: it stays out of the options that key the cached models
        super().__init__(forget_class=forget_class, test_size=test_size, epochs=epochs, **options)
        self.epochs, self.judge_samples = int(epochs), int(judge_samples)
        self.judge: nn.Module | None = None
        self.judge_info: dict[str, float] = {}

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        x, y = super().arrays()
        return (x.reshape(-1, 1, 8, 8) * 2 - 1).astype(np.float32), y

    def build_data(self, scenario: str, seed: int) -> Any:
        data = super().build_data(scenario, seed)
        self.judge, self.judge_info = self._cached_judge(data.train, data.test, seed)
        data.info.update(self.judge_info)
        return data

    def build_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return digits_unet()

    def make_task(self) -> Task:
        return DiffusionTask(num_class_embeds=11, judge=self.judge, eval_samples=self.judge_samples)

    def recipe(self, seed: int) -> TrainRecipe:
        return TrainRecipe(epochs=self.epochs, lr=2e-3, batch_size=64, optimizer="adam", seed=seed)

    def _cached_judge(self, train: IdDataset, test: IdDataset, seed: int) -> tuple[nn.Module, dict[str, float]]:
        """The judge MLP trained on the training split (all classes: it must recognise the erased one), cached."""
        root = self.cache_dir or cache_root()
        path = root / f"{self.name}-judge-seed{seed}-{self.test_size}.pt"
        meta = path.with_suffix(".json")
        torch.manual_seed(seed)
        judge = ImageJudge(MLP(64, (256, 128), 10))
        if path.exists() and meta.exists():
            judge.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return judge.eval(), json.loads(meta.read_text())
        recipe = TrainRecipe(**{**JUDGE_RECIPE.to_dict(), "seed": seed})
        train_model(judge, train, ClassificationTask(), recipe)
        info = {"judge_test_acc": _accuracy(judge, test)}
        atomic_torch_save(judge.state_dict(), path)
        atomic_write_text(meta, json.dumps(info))
        return judge.eval(), info


class DigitsPromptDiffusionBenchmark(DigitsDiffusionBenchmark):
    """``digits_prompt_diffusion``: the same data, split, judge and scenarios with a prompt-conditioned model
    (:func:`digits_prompt_model`): the erased concept is the class's prompts ("a handwritten three", "the digit
    three", ...); the gold model is the same recipe on the retain set. The recipe trains the model with prompt
    dropout 0.1 (the empty prompt is the unconditional prediction).

    Args:
        channels, width: the UNet's block widths and the text encoder's width. Default (16, 32) / 32 with 60 epochs
            (1380 steps): at the class-conditional recipe's (32, 64) / 20 epochs the prompt is learned too weakly
            (judged rate of "a handwritten three" 0.19); see ``benchmarks/diffusion/RESULTS.md``.
        epochs, forget_class, judge_samples: as :class:`DigitsDiffusionBenchmark`.
    """

    name = "digits_prompt_diffusion"
    task_class = PromptDiffusionTask

    def __init__(self, forget_class: int = 3, test_size: float = 0.2, epochs: int = 60, judge_samples: int = 64,
                 channels: tuple[int, int] = (16, 32), width: int = 32, **options: Any) -> None:
        super().__init__(forget_class=forget_class, test_size=test_size, epochs=epochs, judge_samples=judge_samples,
                         channels=list(channels), width=width, **options)
        self.channels, self.width = tuple(channels), int(width)

    def build_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return digits_prompt_model(self.channels, groups=min(8, self.channels[0]), width=self.width)

    def make_task(self) -> Task:
        return PromptDiffusionTask.from_model(self.build_model(0), judge=self.judge, eval_samples=self.judge_samples)


@torch.no_grad()
def _accuracy(judge: nn.Module, data: IdDataset) -> float:
    base: ArrayDataset = data.base  # type: ignore[assignment]
    rows = torch.as_tensor(np.asarray(data.positions))
    return float((judge(base.x[rows]).argmax(-1) == base.y[rows]).float().mean())


__all__ = ["DIGIT_NAMES", "PROMPT_TEMPLATES", "DigitsDiffusionBenchmark", "DigitsPromptDiffusionBenchmark", "digits_prompt_model", "word_tokenizer", "ImageJudge", "digits_unet", "generation_rate"]
