"""Image -> text recall@k over a contrastive model's caption set, against hand computations: the per-unit rule on
hand-made logits, and the registered ``<split>_recall5`` on the tiny CLIP against its own ``logits_per_image``."""


import numpy as np
import pytest
import torch

from erasus_ray.data import as_id_dataset
from erasus_ray.evaluation import evaluate, metric_names_for
from erasus_ray.evaluation.retrieval import recall_at_k
from erasus_ray.tasks.contrastive import ContrastiveTask


def test_recall_at_k_counts_a_target_inside_the_top_k_and_averages_units_per_sample():
    logits = torch.tensor([[5.0, 4, 3, 2, 1, 0],    # target 4 ranks 5th: in the top 5, not the top 1
                           [0.0, 1, 2, 3, 4, 5],    # target 0 ranks 6th: in neither
                           [0.0, 9, 1, 1, 1, 1],    # target 1 ranks 1st
                           [9.0, 8, 7, 6, 5, 0]])   # target 5 ranks 6th
    targets = torch.tensor([4, 0, 1, 5])
    owner = torch.tensor([0, 1, 2, 2])  # sample 2 owns two units: one hit, one miss
    assert recall_at_k(logits, targets, owner, 3, 5).tolist() == [1.0, 0.0, 0.5]
    assert recall_at_k(logits, targets, owner, 3, 1).tolist() == [0.0, 0.0, 0.5]
    assert recall_at_k(logits, targets, owner, 3, 6).tolist() == [1.0, 1.0, 1.0]  # k >= classes: every target
    assert recall_at_k(logits, targets, owner, 3, 99).tolist() == [1.0, 1.0, 1.0]  # capped at the classes


def test_clip_recall5_matches_a_hand_computation_from_the_models_own_logits():
    from sklearn.datasets import load_digits

    from erasus_ray.benchmarks.clip import CaptionedDigitArrays, ClipDigitsBenchmark

    digits = load_digits()
    data = as_id_dataset(CaptionedDigitArrays(digits.data[:64] / 16.0, digits.target[:64]))
    spec = ClipDigitsBenchmark()
    model, task = spec.build_model(0), spec.make_task()  # untrained: ranks spread over the ten captions
    images = torch.stack([data[i][1][0] for i in range(len(data))])
    labels = torch.tensor([data[i][1][2] for i in range(len(data))])
    model.eval()
    with torch.no_grad():
        logits = model(pixel_values=images, input_ids=task.captions).logits_per_image
    ranks = (logits > logits.gather(1, labels[:, None])).sum(1)  # captions scored strictly above the own caption
    m = evaluate(model, forget=data, retain=data, test=data, task=task)
    assert m["forget_recall5"] == pytest.approx(float((ranks < 5).float().mean()))
    assert m["forget_acc"] == pytest.approx(float((ranks < 1).float().mean()))  # recall@1 is the zero-shot accuracy
    assert 0.0 < m["forget_recall5"] < 1.0 and m["forget_recall5"] > m["forget_acc"]  # a check that could fail


def test_recall_is_only_in_the_suite_of_an_adapter_with_captions_and_refused_by_name_without():
    assert "forget_recall5" in metric_names_for(ContrastiveTask(captions=torch.zeros(10, 3, dtype=torch.long)))
    in_batch = ContrastiveTask()
    assert not any("recall" in n for n in metric_names_for(in_batch))
    data = as_id_dataset([(np.zeros((1, 8, 8), np.float32), [1, 2], 0)] * 2)
    with pytest.raises(Exception, match="recall5|logits"):
        evaluate(torch.nn.Identity(), forget=data, retain=data, test=data, task=in_batch, metrics=["forget_recall5"])
