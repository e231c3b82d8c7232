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

    b = load_benchmark("audio", seed=0, gold=False)  # the cached original (the effect test trains the gold model)
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


def test_a_parametrized_model_pickles_through_shippable_with_its_parametrization_intact():
    """Wav2Vec2's positional convolution is weight-normed (a torch parametrization), which pickling refuses, and after
    its first forward transformers' capture hooks hold a ContextVar - why ray.put / Ray Train could not ship the audio
    model. shippable's copy keeps the parametrization (weight_g
    and weight_v stay separate parameters), every state_dict tensor and the outputs bit for bit."""
    from ray import cloudpickle as pickle  # what ray.put and Ray Train pickle with
    from torch.nn.utils import parametrize

    from erasus_ray.benchmarks.audio import tiny_speech_wav2vec2
    from erasus_ray.utils.shipping import shippable, unshipped

    torch.manual_seed(0)
    model = tiny_speech_wav2vec2().eval()
    with pytest.raises(RuntimeError, match="parametrized"):
        pickle.dumps(model)
    # twice, as a Ray Train config travels (driver -> controller -> workers)
    copy = unshipped(pickle.loads(pickle.dumps(pickle.loads(pickle.dumps(shippable(model))))))
    assert type(copy) is type(model)
    assert [n for n, m in copy.named_modules() if parametrize.is_parametrized(m)] == \
        [n for n, m in model.named_modules() if parametrize.is_parametrized(m)] != []
    a, b = model.state_dict(), copy.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(2, 3200)
    assert torch.equal(model(x).logits, copy(x).logits)
    # after a forward, transformers' output-capturing hooks (closing over a ContextVar) are installed: still ships
    assert any(m._forward_hooks for m in model.modules())
    again = unshipped(pickle.loads(pickle.dumps(shippable(model))))
    assert torch.equal(again(x).logits, model(x).logits)
    assert model(x, output_hidden_states=True).hidden_states is not None  # the original's hooks still work
    assert shippable(torch.nn.Linear(2, 2)).__class__ is torch.nn.Linear  # nothing to fold: sent as it is
