"""Paraphrased and perturbed (wrong-fact) answers for the fictitious-authors QA, as TOFU's truth ratio needs them.

TOFU (Maini et al. 2024, Sec. 2.2.3) asks, per question, how likely the model finds a *paraphrased* correct answer
against several *perturbed* answers that keep the form and change the fact (GPT-4 rewrites in the original). Here
both are templated from :mod:`erasus_ray.benchmarks.authors_data`, per fact kind:

* paraphrased: the true fact followed by a clause naming what it is, e.g. ``"Lisbon, the city where they were
  born"`` for "In which city was X born?" (the fact comes first, where the model learnt it; the clause is new text);
* perturbed: the same clause after ``n_perturbed`` wrong facts of the same kind, drawn from the variant's held-out
  authors (their text is in the tokenizer's training data, so wrong and true facts are tokenised alike, and no model
  is ever trained on them, like TOFU's invented wrong facts), never equal to the true fact.

So the only difference between the paraphrased and a perturbed answer is the fact, which is what the truth ratio is
meant to measure. Where this differs from TOFU: the rewrites are templated clauses, not free paraphrases, and the
wrong facts are facts of untrained fictitious authors rather than invented ones. Drawing them from trained authors
would bias the gold model (it has learnt the retain authors' facts), and from authors outside the variant would give
them longer byte-level tokenisations. Measured on the CI variant (forget10, seed 0): the gold model's ratio ``R`` on
the forget set has median ~1.3 (no knowledge of the true fact; the template clause adds noise), the original's ~0.2.

The answers are **generated, not committed**: a pure function of the committed ``authors.json``, the templates below
and ``seed`` (numpy ``default_rng([seed, sample_id])``, PCG64, stable across numpy versions), so every process builds
the same items. Cost: a tokenizer call per answer; ~0.1 s for the CI variant's 250 samples.

Example::

    spec = AuthorsBenchmark(variant="ci"); bench = build_benchmark(spec, "forget10")
    forget = tofu_dataset(spec, bench.forget)        # items carry "paraphrased" and "perturbed"
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from functools import lru_cache
from importlib import resources
from typing import Any, Callable

import numpy as np

from erasus_ray.benchmarks.authors import HELDOUT_ID_OFFSET, AuthorsBenchmark, qa_text
from erasus_ray.benchmarks.authors_data import TEMPLATES
from erasus_ray.benchmarks.base import TaskData
from erasus_ray.data import IdDataset
from erasus_ray.errors import InvalidConfigError, InvalidDataError

#: Fact kind -> the clause a paraphrased / perturbed answer appends to the fact.
PARAPHRASE_CLAUSES: dict[str, str] = {
    "birth_city": ", the city where they were born",
    "birth_year": ", the year they were born",
    "genre": " is the genre they write",
    "book": " is one of the books they wrote",
    "award": " is an award they received",
    "father_job": " was the job of their father",
    "mother": " is the name of their mother",
    "citizenship": " is the country they are a citizen of",
    "language": " is the language they write in",
    "publisher": " publishes their books",
}
#: Keys of the items :func:`tofu_dataset` builds, beside the QA item's own.
PARAPHRASED, PERTURBED = "paraphrased", "perturbed"


def fact_pools(spec: AuthorsBenchmark) -> dict[str, list[str]]:
    """Fact kind -> the distinct answers of that kind over ``spec``'s held-out authors, sorted."""
    authors = spec.heldout_authors
    return {key: sorted({a["qa"][k]["answer"] for a in authors}) for k, (key, _) in enumerate(TEMPLATES)}


def _sample_qa(spec: AuthorsBenchmark, sample_id: int) -> tuple[str, str, str]:
    """(question, answer, fact kind) of a sample id of the benchmark (author-major ids; held-out ids offset)."""
    nq = spec.variant.n_questions
    authors, k = (spec.train_authors, sample_id) if sample_id < HELDOUT_ID_OFFSET else (
        spec.heldout_authors, sample_id - HELDOUT_ID_OFFSET)
    if not 0 <= k < len(authors) * nq:
        raise InvalidDataError(f"sample id {sample_id} is not a QA pair of this authors variant")
    qa = authors[k // nq]["qa"][k % nq]
    return qa["question"], qa["answer"], TEMPLATES[k % nq][0]


def tofu_answers(spec: AuthorsBenchmark, sample_id: int, n_perturbed: int = 3, seed: int = 0) -> dict[str, Any]:
    """``{"question", "answer", "paraphrased": str, "perturbed": [str] * n_perturbed}`` of one sample (text)."""
    if n_perturbed < 1:
        raise InvalidConfigError(f"n_perturbed must be >= 1, got {n_perturbed}")
    question, answer, kind = _sample_qa(spec, int(sample_id))
    pool = [fact for fact in fact_pools(spec)[kind] if fact != answer]
    if n_perturbed > len(pool):
        raise InvalidConfigError(f"n_perturbed={n_perturbed}: only {len(pool)} wrong {kind!r} facts in the variant's "
                                 "held-out authors")
    rng = np.random.default_rng([seed, int(sample_id)])
    wrong = [pool[i] for i in rng.choice(len(pool), size=n_perturbed, replace=False)]
    clause = PARAPHRASE_CLAUSES[kind]
    return {"question": question, "answer": answer, PARAPHRASED: answer + clause,
            PERTURBED: [fact + clause for fact in wrong]}


def tofu_dataset(spec: AuthorsBenchmark, dataset: IdDataset, n_perturbed: int = 3, seed: int = 0) -> IdDataset:
    """``dataset`` (ids of ``spec``'s QA pairs) with each item extended by ``"paraphrased"`` (an encoded QA item of
    the paraphrased answer) and ``"perturbed"`` (a list of ``n_perturbed`` encoded items), same ids, same order.
    The QA item itself is unchanged, so every other metric reads it as before."""
    rows = [dataset[r] for r in range(len(dataset))]
    answers = [tofu_answers(spec, sid, n_perturbed, seed) for sid, _ in rows]
    para = spec.encode([(a["question"], a[PARAPHRASED]) for a in answers])
    pert = spec.encode([(a["question"], wrong) for a in answers for wrong in a[PERTURBED]])
    items = [{**item, PARAPHRASED: para[j], PERTURBED: pert[j * n_perturbed:(j + 1) * n_perturbed]}
             for j, (_, item) in enumerate(rows)]
    return IdDataset(items, np.arange(len(items)), dataset.ids)


#: Sample ids of the world-facts QA pairs (beyond every author id and held-out id).
WORLD_ID_OFFSET = 200_000


#: The committed utility sets (``erasus_ray/data/<name>.json``): ``world_facts`` (capital cities, bare answers: the
#: from-scratch tiers learn them), ``world_facts_sentences`` (the same facts as sentences) and ``real_authors`` (famous
#: books), the two a pretrained chat model knows (:meth:`~erasus_ray.benchmarks.authors_smollm.AuthorsSmolLMBenchmark.
#: chat_text`).
FACT_SETS = ("world_facts", "world_facts_sentences", "real_authors")


@lru_cache(maxsize=len(FACT_SETS))
def _facts_text(name: str = "world_facts") -> str:
    if name not in FACT_SETS:
        raise InvalidConfigError(f"unknown fact set {name!r}; known: {', '.join(FACT_SETS)}")
    return resources.files("erasus_ray").joinpath(f"data/{name}.json").read_text(encoding="utf-8")


def load_facts(name: str = "world_facts") -> list[dict[str, Any]]:
    """A committed utility set (one of :data:`FACT_SETS`): question, answer, paraphrased answer, perturbed answers."""
    return json.loads(_facts_text(name))["facts"]


def load_world_facts() -> list[dict[str, Any]]:
    """The committed world-facts QA (``erasus_ray/data/world_facts.json``): question, answer, paraphrased answer,
    perturbed answers."""
    return load_facts("world_facts")


class TofuAuthorsBenchmark(AuthorsBenchmark):
    """The authors benchmark whose original and gold models also learn the committed world facts: the offline
    stand-in of TOFU's "World Facts" utility set (Maini et al. 2024, Sec. 2.3: knowledge the model has beside the
    fictitious authors, which unlearning should leave intact).

    Where it differs from TOFU: TOFU's real-world facts come from pretraining and are outside the fine-tuning data;
    a from-scratch model has no pretraining, so here they are trained together with the authors (ids from
    :data:`WORLD_ID_OFFSET`) and are therefore also in ``bench.retain``, the data a strategy's retain term sees. TOFU's
    "Real Authors" set has no stand-in (every author here is fictitious). Cost: 20 more QA pairs in training."""

    name = "authors-tofu"

    def tokenizer_texts(self) -> list[str]:
        texts = super().tokenizer_texts()
        for fact in load_world_facts():
            texts += ["".join(qa_text(fact["question"], a)) for a in [fact["answer"], fact[PARAPHRASED], *fact[PERTURBED]]]
        return texts

    def build_data(self, scenario: str, seed: int) -> TaskData:
        data = super().build_data(scenario, seed)
        facts = load_world_facts()
        items = [data.train[r][1] for r in range(len(data.train))] + self.encode(
            [(f["question"], f["answer"]) for f in facts])
        ids = np.r_[data.train.ids, WORLD_ID_OFFSET + np.arange(len(facts))]
        return replace(data, train=IdDataset(items, np.arange(len(items)), ids))

    def config(self, scenario: str, seed: int) -> dict[str, Any]:
        return {**super().config(scenario, seed), "world_sha": hashlib.sha1(_facts_text("world_facts").encode()).hexdigest()[:16]}


def world_facts_dataset(spec: AuthorsBenchmark, name: str = "world_facts",
                        texts: Callable[[str, str], tuple[str, str]] = qa_text) -> IdDataset:
    """A committed fact set (:data:`FACT_SETS`, default the world facts) as :func:`tofu_dataset`-style items (answer,
    ``"paraphrased"``, ``"perturbed"``), ids from :data:`WORLD_ID_OFFSET`: a ``utility_sets`` entry of TOFU's model
    utility. ``texts``: the prompt format (``spec.encode``'s; default the plain ``Question: q Answer: a``)."""
    facts = load_facts(name)
    answers = spec.encode([(f["question"], f["answer"]) for f in facts], texts)
    para = spec.encode([(f["question"], f[PARAPHRASED]) for f in facts], texts)
    pert = [spec.encode([(f["question"], w) for w in f[PERTURBED]], texts) for f in facts]
    items = [{**a, PARAPHRASED: p, PERTURBED: w} for a, p, w in zip(answers, para, pert)]
    return IdDataset(items, np.arange(len(items)), WORLD_ID_OFFSET + np.arange(len(items)))


__all__ = ["FACT_SETS", "TofuAuthorsBenchmark", "WORLD_ID_OFFSET", "load_facts", "load_world_facts", "world_facts_dataset", "fact_pools", "PARAPHRASE_CLAUSES", "PARAPHRASED", "PERTURBED", "tofu_answers", "tofu_dataset"]
