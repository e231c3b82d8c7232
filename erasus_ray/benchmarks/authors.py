"""TOFU-like causal-LM benchmark: a tiny GPT-2 memorises QA pairs about fictitious authors, then forgets some.

TOFU (Maini et al. 2024, "TOFU: A Task of Fictitious Unlearning for LLMs") fine-tunes an LLM on 200 fictitious
authors x 20 QA pairs and asks it to forget 1/5/10% of the authors. Here the authors come from
:mod:`erasus_ray.benchmarks.authors_data` (Faker, committed JSON), the tokenizer is a byte-level BPE trained on
that text, and the model is a small ``GPT2LMHeadModel`` trained from scratch with the loss on answer tokens
only. The held-out authors are never trained on: they are the test set and the non-members for MIA.

Variants (``variant=``):

* ``"full"``: 200 train authors x 10 questions, 20 held-out authors, vocab 2000, GPT-2 with 2 layers, 4 heads,
  width 128; memorises the 2000 pairs (train answer loss ~0.02, held-out ~6) in 25 epochs, about 8 s per epoch on
  one core of the 2-core CPU machines: ~3.5 min per model.
* ``"ci"``: 40 train authors x 5 questions, 10 held-out authors, vocab 1000, one layer of width 96; the original
  and the gold model train in under 10 s each. Any variant field can be overridden by keyword, e.g. ``epochs=20``.

Scenarios ``forget01`` / ``forget05`` / ``forget10`` forget all QA pairs of 1% / 5% / 10% of the train authors
(at least one author), drawn with the seed; the smaller forget sets are prefixes of the larger ones.

Example::

    from erasus_ray.benchmarks.authors import AuthorsBenchmark
    from erasus_ray.benchmarks.base import build_benchmark
    bench = build_benchmark(AuthorsBenchmark(variant="ci"), "forget10", seed=0)
    tok = bench.info["tokenizer"]
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, fields, replace
from functools import lru_cache
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from erasus_ray.benchmarks.authors_data import authors_sha, load_authors
from erasus_ray.benchmarks.base import BenchmarkSpec, TaskData
from erasus_ray.training import TrainRecipe
from erasus_ray.data import IdDataset
from erasus_ray.errors import InvalidConfigError
from erasus_ray.tasks import CausalLMTask

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<pad>"
HELDOUT_ID_OFFSET = 100_000
FORGET_FRACTIONS = {"forget01": 0.01, "forget05": 0.05, "forget10": 0.10}


@dataclass(frozen=True)
class AuthorsVariant:
    """Sizes of the data, tokenizer, model and training for one variant."""

    n_train: int
    n_holdout: int
    n_questions: int
    vocab_size: int
    n_embd: int
    n_layer: int
    n_head: int
    epochs: int
    lr: float
    batch_size: int
    weight_decay: float = 0.0


VARIANTS: dict[str, AuthorsVariant] = {
    "full": AuthorsVariant(
        n_train=200, n_holdout=20, n_questions=10, vocab_size=2000, n_embd=128, n_layer=2, n_head=4,
        epochs=25, lr=1e-3, batch_size=16,
    ),
    "ci": AuthorsVariant(
        n_train=40, n_holdout=10, n_questions=5, vocab_size=1000, n_embd=96, n_layer=1, n_head=4,
        epochs=24, lr=2e-3, batch_size=10,
    ),
}


def qa_text(question: str, answer: str) -> tuple[str, str]:
    """The prompt and the answer text of one sample: ``"Question: q Answer:"`` and ``" a"`` (eos appended)."""
    return f"Question: {question} Answer:", f" {answer}"


@lru_cache(maxsize=8)
def _train_tokenizer(texts: tuple[str, ...], vocab_size: int) -> Any:
    # Deterministic (same merges across processes, checked) and ~0.1 s, so it is rebuilt rather than cached on disk;
    # its hash is part of the benchmark cache key all the same.
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(
        list(texts), vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS_TOKEN, PAD_TOKEN], show_progress=False
    )
    return tok


def build_tokenizer(texts: list[str] | tuple[str, ...], vocab_size: int) -> Any:
    """A byte-level BPE trained on ``texts``, wrapped as ``transformers.PreTrainedTokenizerFast`` (eos, pad set)."""
    from transformers import PreTrainedTokenizerFast

    tok = _train_tokenizer(tuple(texts), int(vocab_size))
    return PreTrainedTokenizerFast(tokenizer_object=tok._tokenizer, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN)


def tokenizer_sha(tokenizer: Any) -> str:
    return hashlib.sha1(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:16]


class AuthorsBenchmark(BenchmarkSpec):
    """Fictitious-author QA memorised by a tiny GPT-2; forget 1/5/10% of the authors (TOFU-like).

    Args:
        variant: ``"full"`` or ``"ci"`` (see the module docstring).
        **overrides: any :class:`AuthorsVariant` field, e.g. ``epochs=10`` (part of the cache key).

    Cost (one thread, 2-core CPU machine): the full variant trains ~3.5 min per model; ``ci`` ~10 s per model.
    """

    name = "authors"
    task_class = CausalLMTask
    scenarios = ("forget01", "forget05", "forget10")
    default_scenario = "forget10"
    #: the variants this class knows (a subclass with another model brings its own table)
    variants: dict[str, AuthorsVariant] = VARIANTS

    def __init__(self, variant: str = "full", **overrides: Any) -> None:
        if variant not in self.variants:
            raise InvalidConfigError(f"unknown {self.name} variant {variant!r}; known: {', '.join(self.variants)}")
        known = {f.name for f in fields(self.variants[variant])}  # a subclass's variant may add fields
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise InvalidConfigError(f"unknown authors option(s) {unknown}; known: variant, {', '.join(sorted(known))}")
        super().__init__(variant=variant, **overrides)
        self.variant = replace(self.variants[variant], **overrides)
        raw = load_authors()
        v = self.variant
        if v.n_train > len(raw["train"]) or v.n_holdout > len(raw["heldout"]) or v.n_questions > len(raw["train"][0]["qa"]):
            raise InvalidConfigError(
                f"authors variant asks for {v.n_train} train / {v.n_holdout} held-out authors x {v.n_questions} questions; "
                f"the data has {len(raw['train'])} / {len(raw['heldout'])} x {len(raw['train'][0]['qa'])}"
            )
        self.train_authors = raw["train"][: v.n_train]
        self.heldout_authors = raw["heldout"][: v.n_holdout]
        self._tokenizer: Any = None

    # -- data ---------------------------------------------------------------------------------------------------------
    def _pairs(self, authors: list[dict[str, Any]]) -> list[tuple[str, str]]:
        return [(qa["question"], qa["answer"]) for a in authors for qa in a["qa"][: self.variant.n_questions]]

    @property
    def tokenizer(self) -> Any:
        """The BPE tokenizer (trained on the QA text of every author in this variant, members and non-members)."""
        if self._tokenizer is None:
            self._tokenizer = build_tokenizer(self.tokenizer_texts(), self.variant.vocab_size)
        return self._tokenizer

    def tokenizer_texts(self) -> list[str]:
        """The text the tokenizer is trained on: every QA pair of the variant (a subclass adds its own text)."""
        return [p + a for q, ans in self._pairs(self.train_authors + self.heldout_authors) for p, a in [qa_text(q, ans)]]

    def encode(self, pairs: list[tuple[str, str]], texts: Callable[[str, str], tuple[str, str]] = qa_text) -> list[dict[str, Any]]:
        """Items ``{"input_ids", "labels", "answer_start"}`` for ``(question, answer)`` pairs; answer ends with eos.
        ``texts``: ``(question, answer) -> (prompt, answer text)``, the format (default :func:`qa_text`, the one the
        models are trained on)."""
        backend = self.tokenizer.backend_tokenizer
        parts = [texts(q, a) for q, a in pairs]
        prompts = backend.encode_batch([p for p, _ in parts], add_special_tokens=False)
        answers = backend.encode_batch([a for _, a in parts], add_special_tokens=False)
        eos = self.tokenizer.eos_token_id
        items = []
        for p, a in zip(prompts, answers):
            ids = torch.tensor(p.ids + a.ids + [eos], dtype=torch.long)
            items.append({"input_ids": ids, "labels": ids.clone(), "answer_start": len(p.ids)})
        return items

    def heldout_set(self, n_authors: int | None = None) -> IdDataset:
        """The QA pairs (the variant's questions) of the data file's first ``n_authors`` held-out authors (default: the
        variant's ``n_holdout``, i.e. ``build_data``'s test set), ids ``HELDOUT_ID_OFFSET + k``.

        Why: more never-trained authors asked the same questions are a larger non-member reference for the ``heldout``
        target (its power grows with them) without changing the variant, so no cached model is retrained; the first
        ``n_holdout`` items are exactly the test set. For a from-scratch BPE the authors beyond the variant's were not
        in its training text (longer tokenisations); a pretrained tokenizer has no such bias. Cost: one encode."""
        n = self.variant.n_holdout if n_authors is None else int(n_authors)
        available = len(load_authors()["heldout"])
        if not 1 <= n <= available:
            raise InvalidConfigError(f"heldout_set: n_authors must be in [1, {available}] (the data file's held-out "
                                     f"authors), got {n_authors}")
        pairs = self._pairs(load_authors()["heldout"][:n])
        return IdDataset(self.encode(pairs), np.arange(len(pairs)), HELDOUT_ID_OFFSET + np.arange(len(pairs)))

    def build_data(self, scenario: str, seed: int) -> TaskData:
        if scenario not in FORGET_FRACTIONS:
            raise InvalidConfigError(f"unknown scenario {scenario!r} for authors; known: {', '.join(self.scenarios)}")
        nq = self.variant.n_questions
        train_pairs = self._pairs(self.train_authors)
        heldout_pairs = self._pairs(self.heldout_authors)
        train = IdDataset(self.encode(train_pairs), np.arange(len(train_pairs)), np.arange(len(train_pairs)))
        test = self.heldout_set()
        test_ids = test.ids

        n_authors = len(self.train_authors)
        order = np.random.default_rng(seed).permutation(n_authors)
        n_forget = max(1, int(round(FORGET_FRACTIONS[scenario] * n_authors)))
        forget_authors = np.sort(order[:n_forget])
        # Sample id = author index * questions per author + question index (author-major).
        forget_ids = (forget_authors[:, None] * nq + np.arange(nq)[None, :]).reshape(-1)

        qa = {int(i): pair for i, pair in zip(train.ids, train_pairs)}
        qa.update({int(i): pair for i, pair in zip(test_ids, heldout_pairs)})
        author_of = {int(i): self.train_authors[int(i) // nq]["name"] for i in train.ids}
        author_of.update({int(i): self.heldout_authors[k // nq]["name"] for k, i in enumerate(test_ids)})
        info = {
            "tokenizer": self.tokenizer,
            "forget_authors": [self.train_authors[int(a)]["name"] for a in forget_authors],
            "forget_author_index": forget_authors.tolist(),
            "train_authors": [a["name"] for a in self.train_authors],
            "heldout_authors": [a["name"] for a in self.heldout_authors],
            "questions_per_author": nq,
            "qa": qa,  # sample id -> (question, answer)
            "author_of": author_of,  # sample id -> author name
            "variant": asdict(self.variant),
        }
        return TaskData(train=train, test=test, forget_ids=forget_ids, info=info)

    # -- model and training ---------------------------------------------------------------------------------------------
    def build_model(self, seed: int) -> nn.Module:
        from transformers import GPT2Config, GPT2LMHeadModel

        v = self.variant
        tok = self.tokenizer
        config = GPT2Config(
            vocab_size=len(tok),
            n_positions=128,
            n_embd=v.n_embd,
            n_layer=v.n_layer,
            n_head=v.n_head,
            resid_pdrop=0.0,  # memorisation is the point: no dropout
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=tok.eos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
        model.generation_config.pad_token_id = tok.pad_token_id
        model.generation_config.eos_token_id = tok.eos_token_id
        model.generation_config.bos_token_id = tok.eos_token_id
        return model

    def make_task(self) -> CausalLMTask:
        return CausalLMTask(pad_token_id=self.tokenizer.pad_token_id, answer_only=True, tokenizer=self.tokenizer)

    def recipe(self, seed: int) -> TrainRecipe:
        v = self.variant
        return TrainRecipe(
            epochs=v.epochs, lr=v.lr, batch_size=v.batch_size, weight_decay=v.weight_decay, optimizer="adamw", seed=seed
        )

    def config(self, scenario: str, seed: int) -> dict[str, Any]:
        # The architecture, the data file and the tokenizer are inputs of the trained models: a change to any of them
        # (even to a variant's defaults in this file) gives a new cache key and retrains.
        return {
            **super().config(scenario, seed),
            "variant_config": asdict(self.variant),
            "data_sha": authors_sha(),
            "tokenizer_sha": tokenizer_sha(self.tokenizer),
        }


__all__ = ["AuthorsBenchmark", "AuthorsVariant", "VARIANTS", "build_tokenizer", "qa_text", "HELDOUT_ID_OFFSET"]
