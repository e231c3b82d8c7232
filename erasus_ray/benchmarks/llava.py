"""``llava``: a tiny Hugging Face ``LlavaForConditionalGeneration`` (:func:`~erasus_ray.testing.families.llava.tiny_llava`)
answering "what digit is this ?" about scikit-learn's 1797 8x8 digits, through the ``vision_causal_lm`` adapter.
Scenarios as ``digits``: ``class`` forgets every training question about ``forget_class``, ``random10`` a random 10%.
Sample ids are row indices."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from erasus_ray.benchmarks.vision import DigitsBenchmark
from erasus_ray.tasks import Task
from erasus_ray.tasks.vision_lm import VisionCausalLMTask
from erasus_ray.training import TrainRecipe


class DigitQuestionArrays(Dataset):
    """Llava items (``pixel_values``, ``input_ids``, ``answer_start``) over the digits arrays."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        from erasus_ray.testing.families.llava import NAMES, prompt_text, tokenizer

        tok = tokenizer()
        self.x = torch.as_tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8)
        self.y = np.asarray(y)
        self.prompt = tok(prompt_text(), add_special_tokens=False)["input_ids"]
        self.answers = [tok(f"{name} </s>", add_special_tokens=False)["input_ids"] for name in NAMES]

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.x[i], "input_ids": torch.tensor(self.prompt + self.answers[int(self.y[i])]),
                "answer_start": len(self.prompt)}


class LlavaDigitsBenchmark(DigitsBenchmark):
    """The tiny Llava on digit questions; Adam 2e-3, 40 epochs, batch 32 (the matrix family's recipe)."""

    name = "llava"
    task_class = VisionCausalLMTask

    def dataset(self, x: np.ndarray, y: np.ndarray) -> Dataset:
        return DigitQuestionArrays(x, y)

    def build_model(self, seed: int) -> nn.Module:
        from erasus_ray.testing.families.llava import tiny_llava

        torch.manual_seed(seed)
        return tiny_llava()

    def make_task(self) -> Task:
        return self.declared_task()

    @classmethod
    def declared_task(cls) -> Task:
        """The adapter with the family's image token and word-level tokenizer (built offline in milliseconds): the
        class's default instance cannot be built without an image token."""
        from erasus_ray.testing.families.llava import IMAGE, PAD, tokenizer

        return VisionCausalLMTask(image_token_id=IMAGE, image_shape=(1, 8, 8), pad_token_id=PAD, tokenizer=tokenizer())

    def recipe(self, seed: int) -> TrainRecipe:
        return TrainRecipe(epochs=40, lr=2e-3, batch_size=32, optimizer="adam", seed=seed)
