"""Representer values (Yeh et al. 2018) against a hand computation, for a classifier and a causal LM."""

import numpy as np
import pytest
import torch

from erasus_ray.errors import InvalidConfigError
from erasus_ray.selectors import get_selector

from _tolerances import assert_float32_close


@pytest.mark.parametrize("importance", ["norm", "label"])
def test_classifier_by_hand(digits_class, importance):
    b = digits_class
    lam = 0.01
    core = get_selector("representer", l2=lam, importance=importance).select(
        b.original, b.forget, task=b.task, k=5, retain=b.retain
    )
    n = len(b.forget) + len(b.retain)
    assert core.info["n_train"] == n
    x = torch.stack([b.forget[i][1][0] for i in range(len(b.forget))])
    y = torch.stack([b.forget[i][1][1] for i in range(len(b.forget))])
    with torch.no_grad():
        f = b.original.net[:5](x)  # input of the output layer net.5
        p = b.original.net[5](f).softmax(-1)
    alpha = -(p - torch.nn.functional.one_hot(y, 10)) / (2 * lam * n)
    a = alpha.norm(dim=1) if importance == "norm" else alpha.gather(1, y[:, None]).squeeze(1).abs()
    manual = (a * f.norm(dim=1)).numpy()
    got = np.array([core.scores[int(i)] for i in b.forget.ids])
    assert_float32_close(got, manual)  # batches of 128 vs one of all rows: float32 rounding
    ids = b.forget.ids
    assert core.ids.tolist() == ids[np.lexsort((ids, -manual))[:5]].tolist()


def test_lm_by_hand(tiny_lm):
    model, task, forget = tiny_lm["model"], tiny_lm["task"], tiny_lm["forget"]
    lam = 1e-3
    core = get_selector("representer", l2=lam).select(model, forget, task=task, k=3)
    n = len(forget)
    manual = []
    for row in range(len(forget)):
        item = forget[row][1]
        ids = item["input_ids"].unsqueeze(0)
        start = item["answer_start"]
        with torch.no_grad():
            out = model(input_ids=ids, output_hidden_states=True)
        pos = torch.arange(start - 1, ids.shape[1] - 1)  # positions predicting the answer tokens
        feats = out.hidden_states[-1][0, pos].mean(0)
        probs = out.logits[0, pos].softmax(-1)
        onehot = torch.nn.functional.one_hot(ids[0, pos + 1], probs.shape[-1])
        alpha = -(probs - onehot) / len(pos) / (2 * lam * n)
        manual.append(float(alpha.norm() * feats.norm()))
    got = [core.scores[int(i)] for i in forget.ids]
    assert_float32_close(got, manual)  # padded batch vs one sequence at a time


def test_bad_arguments():
    with pytest.raises(InvalidConfigError, match="l2"):
        get_selector("representer", l2=0)
    with pytest.raises(InvalidConfigError, match="importance"):
        get_selector("representer", importance="max")
