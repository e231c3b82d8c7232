"""Your own Hugging Face model and `datasets` data, as folders: this script writes them next to ``job.yaml``.

    python examples/own_hf/own_hf_model.py          # writes bert/, tokenizer/ and texts/ here (~20 s CPU, mostly imports)
    erasus-ray unlearn --config examples/own_hf/job.yaml --no-progress

The data: 240 short sentences in 3 topics (fruit, colour, animal): each word is a topic word with probability 0.6,
else a shared filler word, so the topic is learnable but not from one token. A ``datasets.Dataset`` saved with
``save_to_disk`` into ``texts/``, with a ``doc`` column of non-contiguous ids (``7000 + 7 * i``) and a ``split`` column
marking every fifth row ``test`` (never trained on). The model: a tiny ``BertForSequenceClassification`` (1 layer,
hidden 32) trained to 100% on the ``train`` rows, saved with ``save_pretrained`` into ``bert/``; its byte-level BPE
tokenizer, trained offline on the sentences, into ``tokenizer/``. ``job.yaml`` forgets topic 2 (animals).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

#: topic y's sentences draw 60% of their words from TOPICS[y], the rest from FILLER
TOPICS = (("apple", "pear", "plum", "fig"), ("red", "blue", "green", "gold"), ("dog", "cat", "owl", "fox"))
FILLER = ("the", "a", "and", "of")


def make_dataset(n: int = 240, seed: int = 0):
    """The samples as a ``datasets.Dataset``: ``doc`` (id), ``text``, ``label`` (topic), ``split`` (``train`` / ``test``)."""
    from datasets import Dataset

    rng = np.random.default_rng(seed)
    labels = np.arange(n) % len(TOPICS)
    texts = [" ".join(str(rng.choice(TOPICS[y] if rng.random() < 0.6 else FILLER)) for _ in range(6)) for y in labels]
    return Dataset.from_dict({"doc": (7000 + 7 * np.arange(n)).tolist(), "text": texts, "label": labels.tolist(),
                              "split": ["test" if i % 5 == 4 else "train" for i in range(n)]})


def make_tokenizer(texts: list[str]):
    """A byte-level BPE (vocabulary 120) trained on ``texts``: nothing is downloaded."""
    from erasus_ray.benchmarks.authors import build_tokenizer

    return build_tokenizer(texts, 120)


def train(dataset, tokenizer, steps: int = 40, seed: int = 0):
    """A 1-layer BERT classifier, full-batch Adam on the ``train`` rows; cost: ~1 s of CPU."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, num_labels=len(TOPICS), pad_token_id=tokenizer.pad_token_id))
    rows = [row for row in dataset if row["split"] == "train"]
    enc = tokenizer([row["text"] for row in rows], padding=True, return_tensors="pt")
    labels = torch.tensor([row["label"] for row in rows])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        opt.zero_grad()
        model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=labels).loss.backward()
        opt.step()
    return model.eval()


def write_job_files(folder: str | Path) -> None:
    """Write ``bert/`` (save_pretrained), ``tokenizer/`` and ``texts/`` (``Dataset.save_to_disk``) into ``folder``."""
    folder = Path(folder)
    dataset = make_dataset()
    tokenizer = make_tokenizer(list(dataset["text"]))
    train(dataset, tokenizer).save_pretrained(folder / "bert")
    tokenizer.save_pretrained(folder / "tokenizer")
    dataset.save_to_disk(str(folder / "texts"))


if __name__ == "__main__":
    write_job_files(Path(__file__).resolve().parent)
    print(f"wrote bert/, tokenizer/ and texts/ to {Path(__file__).resolve().parent}")
