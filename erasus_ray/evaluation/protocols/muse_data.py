"""MUSE's offline stand-in: a text corpus about the fictitious authors, with QA pairs built from it.

MUSE (Shi et al. 2024, "MUSE: Machine Unlearning Six-Way Evaluation for Language Models") fine-tunes an LLM on a
corpus (BBC news, Harry Potter books), forgets part of it, and measures verbatim memorisation of the forget text,
knowledge of QA pairs drawn from it, and privacy leakage against held-out text. No such corpus ships in an offline
package (DATA.md), so this one is **generated**: one biography per author of the committed ``authors.json`` (Faker,
seeded), rendered from every fact of the author with the templates below, e.g.

    "Norma Fisher was born in Tammyfort in 1981. Norma Fisher writes crime and wrote The Me of Help, ..."

The QA pairs are the authors QA (:mod:`erasus_ray.benchmarks.authors_data`), whose answers are facts of the
biography. Where this differs from MUSE:

* the model is a tiny GPT-2 trained from scratch (:class:`MuseCorpusBenchmark`), so it has no question-answering
  ability of its own: it is trained on the corpus **and** the QA pairs of every training author (MUSE's target model
  sees only the corpus and answers the QA pairs with its pretrained skills);
* VerbMem prompts are the biography's first clause (``"<name> was born in"``), the continuation is the rest (MUSE:
  the first 32 tokens of a chunk, 128 tokens of continuation);
* the corpus is ~40 biographies of ~60-90 tokens, not millions of tokens.

Sample ids: QA pairs keep the authors ids (author-major); biography of train author ``a`` is ``BIO_ID_OFFSET + a``;
held-out authors' biographies are ``HELDOUT_ID_OFFSET + BIO_ID_OFFSET + a``. Scenario ``forget10`` etc. forget every
sample (QA and biography) of the authors TOFU's scenario picks.

Cost: tokenising the corpus (milliseconds); training as :class:`~erasus_ray.benchmarks.authors.AuthorsBenchmark`
plus the biographies (ci variant: ~15 s per model on one core).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from erasus_ray.benchmarks.authors import HELDOUT_ID_OFFSET, AuthorsBenchmark
from erasus_ray.benchmarks.authors_data import TEMPLATES
from erasus_ray.benchmarks.base import TaskData
from erasus_ray.data import IdDataset
from erasus_ray.errors import InvalidDataError

BIO_ID_OFFSET = 50_000
#: Key of the evaluation items' KnowMem QA pairs (a list of encoded QA items of the same author).
KNOWMEM = "knowmem"
#: The biography's prompt (VerbMem) and its continuation, from the author's facts (keys of TEMPLATES).
BIO_PROMPT = "{name} was born in"
BIO_CONTINUATION = (" {birth_city} in {birth_year}. {name} writes {genre} and wrote {book}, which won {award}."
                    " Their father was a {father_job} and their mother is {mother}. {name} is a citizen of"
                    " {citizenship}, writes in {language} and is published by {publisher}.")


def author_facts(author: dict[str, Any]) -> dict[str, str]:
    """Fact kind -> fact of one author (from its QA answers, in TEMPLATES order) and its ``name``."""
    return {"name": author["name"], **{key: author["qa"][k]["answer"] for k, (key, _) in enumerate(TEMPLATES)}}


def biography(author: dict[str, Any]) -> tuple[str, str]:
    """``(prompt, continuation)`` of one author's biography."""
    facts = author_facts(author)
    return BIO_PROMPT.format(**facts), BIO_CONTINUATION.format(**facts)


class MuseCorpusBenchmark(AuthorsBenchmark):
    """The authors benchmark plus one biography per author (module docstring): the corpus MUSE's metrics read.

    Args: as :class:`~erasus_ray.benchmarks.authors.AuthorsBenchmark` (``variant``, overrides).
    """

    name = "authors_muse"

    def tokenizer_texts(self) -> list[str]:
        # the biographies too: merges over their words keep a biography under the model's 128 positions
        return super().tokenizer_texts() + [p + c for a in self.train_authors + self.heldout_authors
                                            for p, c in [biography(a)]]

    def encode_text(self, pairs: list[tuple[str, str]], full_text: bool) -> list[dict[str, Any]]:
        """Items of ``(prompt, continuation)`` texts, eos appended: ``answer_start`` 0 (the whole text is trained on)
        when ``full_text``, else the prompt's length (the continuation is what generation and the loss score)."""
        backend = self.tokenizer.backend_tokenizer
        prompts = backend.encode_batch([p for p, _ in pairs], add_special_tokens=False)
        conts = backend.encode_batch([c for _, c in pairs], add_special_tokens=False)
        items = []
        for p, c in zip(prompts, conts):
            ids = torch.tensor(p.ids + c.ids + [self.tokenizer.eos_token_id], dtype=torch.long)
            items.append({"input_ids": ids, "labels": ids.clone(), "answer_start": 0 if full_text else len(p.ids)})
        return items

    def build_data(self, scenario: str, seed: int) -> TaskData:
        base = super().build_data(scenario, seed)
        nq = self.variant.n_questions
        bios = self.encode_text([biography(a) for a in self.train_authors], full_text=True)
        train_items = [base.train[r][1] for r in range(len(base.train))] + bios
        ids = np.r_[base.train.ids, BIO_ID_OFFSET + np.arange(len(bios))]
        train = IdDataset(train_items, np.arange(len(train_items)), ids)
        authors = np.asarray(base.info["forget_author_index"], dtype=np.int64)
        forget_ids = np.r_[np.asarray(base.forget_ids), BIO_ID_OFFSET + authors]
        info = {**base.info, "questions_per_author": nq}
        return TaskData(train=train, test=base.test, forget_ids=forget_ids, info=info)

    def muse_split(self, author_ids: Any, heldout: bool = False) -> IdDataset:
        """The evaluation items of some authors (indices into the train or held-out authors): each is the
        biography with ``answer_start`` after the VerbMem prompt, and ``"knowmem"``: that author's encoded QA items.
        Ids: the biographies' sample ids."""
        authors = self.heldout_authors if heldout else self.train_authors
        index = np.asarray(author_ids, dtype=np.int64).reshape(-1)
        if len(index) and (index.min() < 0 or index.max() >= len(authors)):
            raise InvalidDataError(f"author_ids: indices must be in [0, {len(authors)}), got {index.tolist()}")
        nq = self.variant.n_questions
        chosen = [authors[int(a)] for a in index]
        bios = self.encode_text([biography(a) for a in chosen], full_text=False)
        qa = self.encode([(q["question"], q["answer"]) for a in chosen for q in a["qa"][:nq]])
        items = [{**bio, KNOWMEM: qa[j * nq:(j + 1) * nq]} for j, bio in enumerate(bios)]
        ids = BIO_ID_OFFSET + index + (HELDOUT_ID_OFFSET if heldout else 0)
        return IdDataset(items, np.arange(len(items)), ids)

    def muse_splits(self, forget_authors: Any, n_retain: int | None = None) -> tuple[IdDataset, IdDataset, IdDataset]:
        """``(forget, retain, holdout)`` evaluation splits: the forget authors, the first ``n_retain`` other train
        authors (all by default) and every held-out author (PrivLeak's non-members)."""
        forget = np.asarray(forget_authors, dtype=np.int64)
        others = np.setdiff1d(np.arange(len(self.train_authors)), forget)
        others = others if n_retain is None else others[:n_retain]
        return (self.muse_split(forget), self.muse_split(others),
                self.muse_split(np.arange(len(self.heldout_authors)), heldout=True))


__all__ = ["BIO_ID_OFFSET", "KNOWMEM", "MuseCorpusBenchmark", "author_facts", "biography"]
