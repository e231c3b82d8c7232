"""The TOFU-like fictitious-authors benchmark: data, splits, tokenizer, and a memorising original vs the gold model."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from erasus_ray.benchmarks.authors import HELDOUT_ID_OFFSET, AuthorsBenchmark  # noqa: E402
from erasus_ray.benchmarks.authors_data import FAKER_VERSION, generate_authors, load_authors  # noqa: E402
from erasus_ray.benchmarks.base import build_benchmark  # noqa: E402
from erasus_ray.errors import InvalidConfigError  # noqa: E402
from erasus_ray.evaluation.lm import evaluate_lm  # noqa: E402
from erasus_ray.utils import model_hash  # noqa: E402


def test_committed_authors_file():
    data = load_authors()
    assert len(data["train"]) == 200 and len(data["heldout"]) == 20
    names = [a["name"] for a in data["train"] + data["heldout"]]
    assert len(set(names)) == len(names)
    for author in data["train"] + data["heldout"]:
        assert len(author["qa"]) == 10
        for qa in author["qa"]:
            assert author["name"] in qa["question"]
            assert 1 <= len(qa["answer"].split()) <= 6


def test_generator_reproduces_committed_file():
    from importlib.metadata import version

    if version("Faker") != FAKER_VERSION:
        pytest.skip(f"committed file made with Faker {FAKER_VERSION}")
    fresh = generate_authors(seed=0, n_train=3, n_holdout=1, n_questions=10)
    assert fresh["train"] == load_authors()["train"][:3]
    assert generate_authors(seed=1, n_train=3, n_holdout=0)["train"] != fresh["train"]


@pytest.fixture(scope="module")
def ci_spec():
    return AuthorsBenchmark(variant="ci")


def test_ci_data_splits_and_items(ci_spec):
    data = ci_spec.build_data("forget10", seed=0)
    tok = data.info["tokenizer"]
    assert len(data.train) == 40 * 5 and len(data.test) == 10 * 5
    assert data.train.ids.tolist() == list(range(200))
    assert data.test.ids.min() == HELDOUT_ID_OFFSET
    # forget10 of 40 authors = 4 authors, all 5 questions each, author-major ids
    assert len(data.info["forget_authors"]) == 4 and len(data.forget_ids) == 20
    for a in data.info["forget_author_index"]:
        assert set(range(5 * a, 5 * a + 5)) <= set(data.forget_ids.tolist())
    assert {data.info["author_of"][int(i)] for i in data.forget_ids} == set(data.info["forget_authors"])

    sample_id, item = data.train[7]
    question, answer = data.info["qa"][sample_id]
    ids = item["input_ids"]
    assert torch.equal(item["labels"], ids)
    assert ids[-1].item() == tok.eos_token_id
    assert tok.decode(ids[: item["answer_start"]]) == f"Question: {question} Answer:"
    assert tok.decode(ids[item["answer_start"] : -1]) == f" {answer}"
    assert tok.pad_token_id != tok.eos_token_id

    # Scenarios: at least one author, nested prefixes of one seeded permutation; another seed, other authors.
    sizes = {}
    for scenario in ("forget01", "forget05", "forget10"):
        sizes[scenario] = set(ci_spec.build_data(scenario, seed=0).forget_ids.tolist())
    assert [len(s) for s in sizes.values()] == [5, 10, 20]
    assert sizes["forget01"] <= sizes["forget05"] <= sizes["forget10"]
    assert set(ci_spec.build_data("forget10", seed=1).forget_ids.tolist()) != sizes["forget10"]


def test_heldout_set_extends_the_test_set_with_more_held_out_authors_asked_the_same_questions(ci_spec):
    test = ci_spec.build_data("forget10", seed=0).test
    assert ci_spec.heldout_set().ids.tolist() == test.ids.tolist()
    wider = ci_spec.heldout_set(20)  # the data file's 20 held-out authors, the variant has 10
    assert len(wider) == 20 * 5 and wider.ids.tolist() == (HELDOUT_ID_OFFSET + np.arange(100)).tolist()
    for row in (0, 49):  # the variant's own authors come first, item for item
        assert torch.equal(wider[row][1]["input_ids"], test[row][1]["input_ids"])
    raw = load_authors()["heldout"]
    _, item = wider[55]  # author 11, question 0: beyond the variant
    assert ci_spec.tokenizer.decode(item["input_ids"][item["answer_start"]:-1]) == f" {raw[11]['qa'][0]['answer']}"
    for bad in (0, 21):
        with pytest.raises(InvalidConfigError, match="n_authors"):
            ci_spec.heldout_set(bad)


def test_full_variant_data_and_options():
    spec = AuthorsBenchmark()
    data = spec.build_data("forget01", seed=0)
    assert len(data.train) == 2000 and len(data.test) == 200 and len(data.forget_ids) == 20
    assert len(spec.make_task().collate([data.train[0][1]])["input_ids"][0]) < 64
    # The cache key covers the data file and the tokenizer, and the tokenizer is rebuilt identically.
    config = spec.config("forget01", 0)
    assert config["tokenizer_sha"] == AuthorsBenchmark().config("forget01", 0)["tokenizer_sha"]
    assert config["data_sha"]
    with pytest.raises(InvalidConfigError):
        AuthorsBenchmark(variant="huge")
    with pytest.raises(InvalidConfigError):
        AuthorsBenchmark(n_layers=3)
    with pytest.raises(InvalidConfigError):
        AuthorsBenchmark(n_train=500)


@pytest.fixture(scope="module")
def ci_bench(tmp_path_factory):
    cache = os.environ.get("ERASUS_RAY_CACHE") or str(tmp_path_factory.mktemp("authors-cache"))
    start = time.perf_counter()
    bench = build_benchmark(AuthorsBenchmark(variant="ci"), "forget10", seed=0, cache_dir=cache)
    bench.info["build_seconds"] = time.perf_counter() - start
    bench.info["cache_dir"] = cache
    return bench


def test_ci_original_memorises_and_gold_does_not(ci_bench):
    b = ci_bench
    orig = evaluate_lm(b.original, b.task, forget=b.forget, retain=b.retain, test=b.test)
    gold = evaluate_lm(b.gold, b.task, forget=b.forget, retain=b.retain, test=b.test)
    # The original knows the forget authors verbatim and does not know the held-out ones.
    assert orig["forget_loss"] < 1.0 and orig["retain_loss"] < 1.0
    assert orig["test_loss"] > 2.5
    assert orig["forget_rougeL"] > 0.8 and orig["retain_rougeL"] > 0.8
    assert orig["test_rougeL"] < 0.5
    assert orig["mia_mink_auc"] > 0.9
    # The gold model never saw the forget authors: forget looks like held-out data.
    assert gold["forget_loss"] > 2.0 and gold["forget_loss"] > 5 * orig["forget_loss"]
    assert gold["forget_loss"] > 0.6 * gold["test_loss"]
    assert gold["forget_rougeL"] < 0.5
    assert gold["retain_loss"] < 1.0 and gold["retain_rougeL"] > 0.6
    assert gold["mia_mink_auc"] < 0.8


def test_ci_models_load_from_cache(ci_bench):
    again = build_benchmark(AuthorsBenchmark(variant="ci"), "forget10", seed=0, cache_dir=ci_bench.info["cache_dir"])
    assert model_hash(again.original) == model_hash(ci_bench.original)
    assert model_hash(again.gold) == model_hash(ci_bench.gold)
    assert np.array_equal(again.forget_ids, ci_bench.forget_ids)
    assert again.seconds == ci_bench.seconds
