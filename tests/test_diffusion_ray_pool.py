"""Coreset selection on a diffusion forget set through the Ray scoring pool (issue 15): the denoising loss draws its
(timestep, noise) pairs from the sample id, so sharding the forget set over actors changes nothing - the pooled
scores and coreset equal one process's, for the loss- and gradient-based selectors; k-center on the adapter's
features merges by GreeDi and covers the forget set about as well as the centralised greedy. Slow: a 2-actor pool
each, on the tiny 'digits_unet' family."""

import numpy as np
import pytest

pytest.importorskip("diffusers")
ray = pytest.importorskip("ray")

from erasus_ray.distributed import PoolSpec, ScoringPool  # noqa: E402
from erasus_ray.selectors import get_selector  # noqa: E402
from erasus_ray.testing import build_family  # noqa: E402

from _tolerances import assert_float32_close  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def family():
    return build_family("digits_unet")


@pytest.fixture(scope="module")
def pool(ray_cluster):
    """One 2-actor pool for the module: each actor start imports torch and diffusers."""
    with ScoringPool(PoolSpec(num_actors=2)) as p:
        yield p


@pytest.mark.parametrize("name", ["loss", "gradient_norm"])
def test_pooled_scores_on_the_denoising_loss_equal_one_process(name, family, pool):
    f = family
    single = get_selector(name).select(f.model, f.forget, task=f.task, fraction=0.25, seed=0)
    pooled = pool.select(get_selector(name), f.model, f.forget, task=f.task, fraction=0.25, seed=0)
    assert pooled.info["shards"] == 2 and pooled.info["distributed"] == "ray:scores"
    assert pooled.ids.tolist() == single.ids.tolist()
    assert_float32_close(pooled.scores, single.scores)
    assert np.ptp(list(single.scores.values())) > 0  # the scores differ between samples: equal orderings are not a tie


def test_k_center_on_diffusion_features_merges_close_to_centralised(family, pool):
    """GreeDi's merged k-center radius (the largest feature distance of a forget sample to its nearest centre) within
    1.5x of the centralised greedy's, which is itself a 2-approximation (Gonzalez 1985)."""
    import torch

    f = family
    selector = get_selector("k_center")
    single = selector.select(f.model, f.forget, task=f.task, fraction=0.25, seed=0)
    pooled = pool.select(selector, f.model, f.forget, task=f.task, fraction=0.25, seed=0)
    assert len(pooled.ids) == len(single.ids) and set(pooled.ids.tolist()) <= set(f.forget.ids.tolist())

    from erasus_ray.selectors._embeddings import embed

    feats = embed(f.model, f.forget, f.task, "features")
    index = {int(i): k for k, i in enumerate(f.forget.ids)}

    def radius(ids):
        centres = feats[[index[int(i)] for i in ids]]
        return float(torch.cdist(feats, centres).min(dim=1).values.max())

    assert radius(pooled.ids) <= 1.5 * radius(single.ids)
