"""Selective Amnesia's Fisher diagonal: vectorised per-sample gradients (``diffusion_fisher``) against one backward
pass per image (the loop it replaced, kept here as the reference). Same Fisher, the seconds of each.

    python benchmarks/diffusion/fisher_speed.py [--images 48]
"""

import argparse
import time
import types

import torch

from erasus_ray.strategies.selective_amnesia import diffusion_fisher
from erasus_ray.testing import build_family


def per_image_fisher(task, model, images, labels):
    """The reference: one forward+backward per image, squared gradients averaged."""
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    fisher = {n: torch.zeros_like(p) for n, p in named.items()}
    model.eval()
    for row in range(len(images)):
        data = task.collate([(images[row], int(labels[row]))], ids=torch.tensor([row]))
        loss = task.per_sample_loss(model, data).sum()
        for (n, _), g in zip(named.items(), torch.autograd.grad(loss, list(named.values()), allow_unused=True)):
            if g is not None:
                fisher[n] += g.pow(2) / len(images)
    return fisher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48)
    args = parser.parse_args()
    torch.set_num_threads(1)
    fam = build_family("digits_unet")
    labels = torch.arange(args.images) % 10
    images = fam.task.sample(fam.model, labels, seed=0)
    ctx = types.SimpleNamespace(task=fam.task)
    runs = {}
    per_image_fisher(fam.task, fam.model, images[:2], labels[:2])  # warm-up: the first backward pays torch's setup
    diffusion_fisher(ctx, fam.model, images[:2], labels[:2])
    for name, fn in (("per-image loop", lambda: per_image_fisher(fam.task, fam.model, images, labels)),
                     ("vectorised", lambda: diffusion_fisher(ctx, fam.model, images, labels))):
        start = time.perf_counter()
        runs[name] = fn()
        print(f"{name}: {time.perf_counter() - start:.2f} s, Fisher sum {sum(float(v.sum()) for v in runs[name].values()):.6f}")
    worst = max(float((runs["vectorised"][n] - f).abs().max()) for n, f in runs["per-image loop"].items())
    print(f"max |difference|: {worst:.2e}")


if __name__ == "__main__":
    main()
