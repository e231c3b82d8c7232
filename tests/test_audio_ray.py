"""The audio benchmark's Wav2Vec2 on Ray: the scoring pool selects the coreset one process selects, and one Ray Train
worker unlearns it exactly as the local runner does (raw waveforms through the classification adapter both ways)."""

import pytest
import torch

ray = pytest.importorskip("ray")


@pytest.mark.slow
def test_ray_scoring_pool_and_ray_train_run_the_audio_model_like_one_process(ray_cluster):
    from erasus_ray import ErasusUnlearner
    from erasus_ray.benchmarks import load_benchmark
    from erasus_ray.distributed import PoolSpec, ScoringPool
    from erasus_ray.selectors import get_selector

    b = load_benchmark("audio", seed=0)  # cached original + gold (the effect test's models)
    single = get_selector("el2n").select(b.original, b.forget, task=b.task, fraction=0.2, seed=0)
    pooled = ScoringPool(PoolSpec(num_actors=2)).select(get_selector("el2n"), b.original, b.forget, task=b.task,
                                                        fraction=0.2, seed=0)
    assert pooled.info["distributed"] == "ray:scores" and pooled.info["shards"] == 2
    assert pooled.ids.tolist() == single.ids.tolist()

    def fit(**kw):
        torch.manual_seed(0)
        return ErasusUnlearner(b.original, strategy="grad_diff", selector=None, fraction=None, task=b.task, seed=0,
                               progress=False, max_steps=3, lr=1e-3, batch_size=16, **kw).fit(b.forget, b.retain)

    local, remote = fit(), fit(backend="ray_train", num_workers=1)
    assert remote.config["backend"] == "ray_train" and remote.report.steps == local.report.steps == 3
    before, a, c = b.original.state_dict(), local.model.state_dict(), remote.model.state_dict()
    for name in a:
        torch.testing.assert_close(c[name], a[name], atol=1e-5, rtol=1e-4, msg=name)
    assert any(not torch.equal(a[n], before[n]) for n in a), "the run changed the model"
