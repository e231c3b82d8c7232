"""Toy two-tower contrastive model on 8x8 digits paired with token captions ("digit <c> <noise>"), ~0.3 s each.

``contrastive`` scores images against the fixed set of ten class captions (independent, logits, labels);
``contrastive_inbatch`` is the same model family trained and scored with the in-batch InfoNCE loss (loss and
features only), where per-sample algorithms must refuse.
"""

import torch
from torch import nn
from torch.utils.data import Dataset

from erasus_ray.tasks.contrastive import ContrastiveTask
from erasus_ray.testing._family import Family, digits, register_family, seeded, trained_family
from erasus_ray.training import TrainRecipe

VOCAB = 32


class CaptionedDigits(Dataset):
    """``(image [64], tokens [3], label)``: the caption is [class token, 11 + class, a seeded noise token]."""

    def __init__(self, n: int = 500, seed: int = 0) -> None:
        x, y = digits()
        self.x, self.y = x[:n], y[:n]
        self.noise = torch.randint(21, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        c = int(self.y[i])
        return self.x[i], torch.tensor([c + 1, 11 + c, int(self.noise[i])]), c


#: The fixed reference set: one caption per class (padded with 0).
CLASS_CAPTIONS = torch.tensor([[c + 1, 11 + c, 0] for c in range(10)])


class TwoTower(nn.Module):
    """Image MLP and bag-of-tokens text encoder, both into a 16-d space."""

    two_tower = True

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.image = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, dim))
        self.tokens = nn.Embedding(VOCAB, dim, padding_idx=0)
        self.text = nn.Linear(dim, dim)

    def forward(self, images: torch.Tensor, texts: torch.Tensor):
        mask = (texts != 0).unsqueeze(-1).float()
        bag = (self.tokens(texts) * mask).sum(1) / mask.sum(1).clamp_min(1)
        return self.image(images), self.text(bag)


def _family(name: str, task: ContrastiveTask) -> Family:
    recipe = TrainRecipe(epochs=15, lr=1e-2, batch_size=32, seed=0)
    return trained_family(name, seeded(TwoTower), task, CaptionedDigits(), recipe, n_forget=16, n_test=100, cheap=True,
                          lr=1e-2, batch_size=8)


@register_family("two_tower", cheap=True)
def contrastive_family() -> Family:
    return _family("two_tower", ContrastiveTask(captions=CLASS_CAPTIONS, temperature=0.1))


@register_family("two_tower_inbatch", cheap=True)
def contrastive_inbatch_family() -> Family:
    return _family("two_tower_inbatch", ContrastiveTask(temperature=0.1))
