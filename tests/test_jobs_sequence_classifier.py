"""A Hugging Face encoder sequence classifier (a tiny ``BertForSequenceClassification`` trained here, with a BPE
tokenizer trained on the test's text) through a job config: dict batches, HF output objects, save_pretrained output."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from erasus_ray.cli import main
from erasus_ray.tasks import get_task

#: class y's sentences draw 60% of their words from POOLS[y], the rest from SHARED: learnable, not trivially so
POOLS = (("apple", "pear", "plum", "fig"), ("red", "blue", "green", "gold"), ("dog", "cat", "owl", "fox"))
SHARED = ("the", "a", "and", "of")


def _rows(n: int = 240) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        y = i % 3
        words = [str(rng.choice(POOLS[y] if rng.random() < 0.6 else SHARED)) for _ in range(6)]
        rows.append({"doc": 100 + 5 * i, "text": " ".join(words), "label": y, "split": "test" if i % 5 == 4 else "train"})
    return rows


def _accuracy(model, tokenizer, rows) -> float:
    enc = tokenizer([r["text"] for r in rows], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    return float((logits.argmax(1) == torch.tensor([r["label"] for r in rows])).float().mean())


@pytest.fixture
def bert_job(tmp_path):
    """A tiny BERT classifier trained to 100% on the train rows, saved with its tokenizer; the rows as JSON Lines."""
    from transformers import BertConfig, BertForSequenceClassification

    from erasus_ray.benchmarks.authors import build_tokenizer

    rows = _rows()
    tokenizer = build_tokenizer([r["text"] for r in rows], 120)
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, num_labels=3, pad_token_id=tokenizer.pad_token_id))
    train = [r for r in rows if r["split"] == "train"]
    enc = tokenizer([r["text"] for r in train], padding=True, return_tensors="pt")
    labels = torch.tensor([r["label"] for r in train])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        opt.zero_grad()
        model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=labels).loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(tmp_path / "bert")
    tokenizer.save_pretrained(tmp_path / "bert")
    (tmp_path / "texts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path, rows, model, tokenizer


def test_dict_items_collate_padded_and_read_hf_outputs(bert_job):
    _, rows, model, tokenizer = bert_job
    task = get_task("auto", model)
    assert task.name == "classification" and task.pad_token_id == tokenizer.pad_token_id
    items = [{"input_ids": tokenizer(r["text"])["input_ids"][: 3 + i], "labels": r["label"]} for i, r in enumerate(rows[:3])]
    batch = task.collate(items)
    assert batch["input_ids"].shape == (3, 5) and batch["attention_mask"].sum(1).tolist() == [3, 4, 5]
    assert batch["input_ids"][0, 3:].tolist() == [tokenizer.pad_token_id] * 2 and batch["labels"].tolist() == [0, 1, 2]
    out = task.forward(model, batch)  # a SequenceClassifierOutput: its logits are read
    assert out.logits.shape == (3, 3) and out.sample_loss().shape == (3,)


def test_bert_folder_and_jsonl_text_forget_a_class_and_reload(bert_job):
    from transformers import AutoTokenizer, BertForSequenceClassification

    folder, rows, original, tokenizer = bert_job
    job = {"model": {"path": "bert"},
           "data": {"path": "texts.jsonl", "id_column": "doc", "text_column": "text", "label_column": "label",
                    "forget": {"class": 2}, "heldout": {"where": "split == 'test' and label != 2"}},
           "strategy": "grad_diff", "selector": None, "fraction": 1.0, "output": "out"}
    (folder / "job.yaml").write_text(yaml.safe_dump(job))
    assert main(["unlearn", "--config", str(folder / "job.yaml"), "--no-progress"]) == 0
    doc = json.loads((folder / "out" / "results.json").read_text())
    assert doc["config"]["task"] == "classification" and doc["model_file"] == "model"
    assert doc["data"]["forget_ids"] == [r["doc"] for r in rows if r["label"] == 2]
    before, after = doc["metrics_before"], doc["metrics_after"]
    assert before["forget_acc"] > 0.9 and after["forget_acc"] <= 0.1  # the forgotten class is no longer predicted
    assert after["retain_acc"] >= 0.9 and after["test_acc"] >= 0.9  # the other classes, train and held-out, kept
    reloaded = BertForSequenceClassification.from_pretrained(folder / "out" / "model", local_files_only=True)
    reloaded_tok = AutoTokenizer.from_pretrained(folder / "out" / "model", local_files_only=True)
    forget = [r for r in rows if r["label"] == 2]
    kept = [r for r in rows if r["label"] != 2]
    assert _accuracy(original, tokenizer, forget) > 0.9
    assert _accuracy(reloaded, reloaded_tok, forget) <= 0.1 and _accuracy(reloaded, reloaded_tok, kept) >= 0.9
