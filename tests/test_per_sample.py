"""Streamed per-sample gradients and their seeded JL projection (erasus_ray.selectors._per_sample)."""

import pytest
import torch

from erasus_ray.data import make_loader
from erasus_ray.errors import InvalidConfigError
from erasus_ray.selectors import trainable_params
from erasus_ray.selectors._per_sample import GaussianProjector, flatten, per_sample_gradients, unflatten

from _tolerances import assert_float32_close


def _loop_grads(model, task, ds, scope):
    names = set(trainable_params(model, scope))
    rows = []
    for i in ds.ids:
        one = next(iter(make_loader(ds.subset([int(i)]), task.collate, batch_size=1)))
        model.zero_grad()
        task.forward(model, one.data).sample_loss().sum().backward()
        rows.append(torch.cat([p.grad.reshape(-1) for n, p in model.named_parameters() if n in names]))
    model.zero_grad()
    return torch.stack(rows)


@pytest.mark.parametrize("scope", ["last", "all"])
def test_matches_autograd_loop_classifier(digits_class, scope):
    b = digits_class
    ds = b.forget.subset(b.forget_ids[:9])
    fast = per_sample_gradients(b.original, b.task, ds, scope=scope, batch_size=4)
    ref = _loop_grads(b.original, b.task, ds, scope)
    assert fast.shape == ref.shape
    assert_float32_close(fast, ref)  # batched vs one by one: equal up to float32 rounding


def test_matches_autograd_loop_lm(tiny_lm):
    model, task, ds = tiny_lm["model"], tiny_lm["task"], tiny_lm["forget"]
    fast = per_sample_gradients(model, task, ds, scope=["transformer.h.0.mlp", "transformer.ln_f"], batch_size=3)
    ref = _loop_grads(model, task, ds, ["transformer.h.0.mlp", "transformer.ln_f"])
    assert_float32_close(fast, ref)


def test_projection_is_seeded_chunk_invariant_and_preserves_geometry(digits_class):
    b = digits_class
    ds = b.forget
    full = per_sample_gradients(b.original, b.task, ds, scope="last")
    p1 = per_sample_gradients(b.original, b.task, ds, scope="last", proj_dim=2048, seed=3, batch_size=64)
    p2 = per_sample_gradients(b.original, b.task, ds, scope="last", proj_dim=2048, seed=3, batch_size=5)
    p3 = per_sample_gradients(b.original, b.task, ds, scope="last", proj_dim=2048, seed=4)
    assert p1.shape == (len(ds), 2048)
    assert_float32_close(p2, p1)  # same map whatever the chunking (batches of 64 vs 5: float32 rounding)
    assert not torch.allclose(p1, p3)
    gram, pgram = full @ full.T, p1 @ p1.T
    rel = float((pgram - gram).norm() / gram.norm())
    assert rel < 0.1, rel  # JL: E[P P^T] = I; measured ~0.03


def test_projector_uncached_equals_cached():
    v = torch.randn(5, 300)
    a = GaussianProjector([100, 200], 16, seed=1, block_rows=64).project(v)
    b = GaussianProjector([100, 200], 16, seed=1, block_rows=64, cache_limit=0).project(v)
    torch.testing.assert_close(a, b)
    with pytest.raises(InvalidConfigError, match="proj_dim"):
        GaussianProjector([10], 0)


def test_flatten_roundtrip():
    params = {"a": torch.zeros(2, 3), "b": torch.zeros(4)}
    g = {"a": torch.randn(5, 2, 3), "b": torch.randn(5, 4)}
    back = unflatten(flatten(g), params)
    assert all(torch.equal(back[k], g[k]) for k in g)


def _loop_norms(model, task, ds, names):
    from erasus_ray.data import make_loader

    out = []
    for i in ds.ids:
        one = next(iter(make_loader(ds.subset([int(i)]), task.collate, batch_size=1)))
        model.zero_grad()
        task.forward(model, one.data).sample_loss().sum().backward()
        out.append(float(torch.sqrt(sum((p.grad.double() ** 2).sum() for n, p in model.named_parameters() if n in names and p.grad is not None))))
    model.zero_grad()
    return out


def test_factored_norms_equal_per_sample_autograd(digits_class, tiny_lm):
    """Norms from layer factors (one backward, Gram form for sequences) equal a per-sample autograd loop: the MLP
    (all layers) and the GPT-2 block's Conv1D layers (the tied embedding / LayerNorms excluded from scope)."""
    from erasus_ray.data import make_loader
    from erasus_ray.selectors import per_sample_grad_norms, trainable_params
    from erasus_ray.selectors._factored import factored_supported

    b = digits_class
    mlp_ds = b.forget.subset(b.forget_ids[:8])
    lm = tiny_lm["model"].eval()
    conv_names = [n for n, _ in lm.named_parameters() if any(k in n for k in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))]
    cases = [
        (b.original.eval(), b.task, mlp_ds, trainable_params(b.original)),
        (lm, tiny_lm["task"], tiny_lm["forget"], trainable_params(lm, [n.rsplit(".", 1)[0] for n in conv_names])),
    ]
    for model, task, ds, params in cases:
        assert factored_supported(model, set(params))
        batch = next(iter(make_loader(ds, task.collate, batch_size=len(ds))))
        fast = per_sample_grad_norms(model, task, batch.data, params, method="factored")
        ref = _loop_norms(model, task, ds, set(params))
        assert_float32_close(fast, ref)
    # the whole GPT-2: the norms factor the tied wte / lm_head weight (with its cross term) and the position
    # embedding looked up once for the batch; the per-sample *gradients* of a tied weight are not factored
    full = trainable_params(lm)
    assert factored_supported(lm, set(full), norms_only=True) and not factored_supported(lm, set(full))
    ds = tiny_lm["forget"]
    batch = next(iter(make_loader(ds, tiny_lm["task"].collate, batch_size=len(ds))))
    fast = per_sample_grad_norms(lm, tiny_lm["task"], batch.data, full, method="factored")
    assert_float32_close(fast, _loop_norms(lm, tiny_lm["task"], ds, set(full)))


class _BagOfEmbeddings(torch.nn.Module):
    def __init__(self, padding_idx=0, scale_grad_by_freq=False):
        super().__init__()
        self.emb = torch.nn.Embedding(12, 5, padding_idx=padding_idx, scale_grad_by_freq=scale_grad_by_freq)
        self.head = torch.nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.emb(x)).mean(1))


def test_factored_norms_embedding_with_padding_and_repeats():
    """An embedding's per-sample gradient norm from its lookups: repeated tokens add up, the padding row gets no
    gradient; an embedding with scale_grad_by_freq is not factored (auto falls back to torch.func). Both equal the
    per-sample autograd loop."""
    from erasus_ray.data import as_id_dataset
    from erasus_ray.selectors import per_sample_grad_norms
    from erasus_ray.selectors._factored import factored_supported
    from erasus_ray.tasks import get_task

    torch.manual_seed(0)
    x = torch.tensor([[3, 3, 0, 0], [1, 2, 3, 4], [5, 5, 5, 0], [7, 0, 7, 2]])
    ds = as_id_dataset(torch.utils.data.TensorDataset(x, torch.tensor([0, 1, 2, 1])))
    for model, factored in ((_BagOfEmbeddings().eval(), True), (_BagOfEmbeddings(scale_grad_by_freq=True).eval(), False)):
        task = get_task("classification", model)
        params = trainable_params(model)
        assert factored_supported(model, set(params), norms_only=True) == factored
        batch = next(iter(make_loader(ds, task.collate, batch_size=4)))
        got = per_sample_grad_norms(model, task, batch.data, params, method="auto")
        assert_float32_close(got, _loop_norms(model, task, ds, set(params)))
    with pytest.raises(InvalidConfigError, match="factored"):
        per_sample_grad_norms(model, task, batch.data, params, method="factored")


def test_factored_norms_conv2d_equal_per_sample_autograd():
    """Conv2d layers as linear maps of unfolded patches: factored norms equal the per-sample autograd loop."""
    from erasus_ray.benchmarks.models import SmallCNN
    from erasus_ray.data import as_id_dataset, make_loader
    from erasus_ray.selectors import per_sample_grad_norms, trainable_params
    from erasus_ray.selectors._factored import factored_supported
    from erasus_ray.tasks import get_task

    torch.manual_seed(0)
    model = SmallCNN().eval()
    x = torch.randn(6, 1, 28, 28)
    y = torch.randint(0, 10, (6,))
    ds = as_id_dataset(torch.utils.data.TensorDataset(x, y))
    task = get_task("classification", model)
    params = trainable_params(model)
    assert factored_supported(model, set(params))
    batch = next(iter(make_loader(ds, task.collate, batch_size=6)))
    fast = per_sample_grad_norms(model, task, batch.data, params, method="factored")
    assert_float32_close(fast, _loop_norms(model, task, ds, set(params)))


def test_factored_per_sample_grads_equal_torch_func(digits_class, tiny_lm):
    """Per-sample gradients from layer factors (one ordinary backward) equal torch.func's vmap(grad): MLP layers,
    Conv2d, and the GPT-2's Conv1D layers and LayerNorms (the tied embedding excluded)."""
    from erasus_ray.benchmarks.models import SmallCNN
    from erasus_ray.data import as_id_dataset
    from erasus_ray.selectors._per_sample import gradient_method
    from erasus_ray.tasks import get_task

    torch.manual_seed(0)
    cnn = SmallCNN().eval()
    cnn_ds = as_id_dataset(torch.utils.data.TensorDataset(torch.randn(5, 1, 28, 28), torch.randint(0, 10, (5,))))
    lm = tiny_lm["model"].eval()
    lm_scope = [n.rsplit(".", 1)[0] for n, _ in lm.named_parameters() if "wte" not in n and "wpe" not in n]
    b = digits_class
    cases = [
        (b.original.eval(), b.task, b.forget.subset(b.forget_ids[:9]), "all"),
        (cnn, get_task("classification", cnn), cnn_ds, "all"),
        (lm, tiny_lm["task"], tiny_lm["forget"], lm_scope),
    ]
    for model, task, ds, scope in cases:
        params = trainable_params(model, scope)
        assert gradient_method(model, params) == "factored"
        fast = per_sample_gradients(model, task, ds, scope=scope, batch_size=4)
        ref = per_sample_gradients(model, task, ds, scope=scope, batch_size=4, method="func")
        assert_float32_close(fast, ref)


def test_factored_paths_exact_with_in_place_activations():
    """``nn.ReLU(inplace=True)`` after a scoped layer overwrites that layer's output; the factored norms and
    per-sample gradients must still use the gradient w.r.t. the layer's own output (a regression: asking autograd
    for the gradient of the overwritten tensor gave the post-ReLU gradient, norms off by up to 2x)."""
    from torch import nn

    from erasus_ray.data import as_id_dataset
    from erasus_ray.selectors import per_sample_grad_norms
    from erasus_ray.tasks import get_task

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(inplace=True), nn.Linear(7, 3)).eval()
    ds = as_id_dataset(torch.utils.data.TensorDataset(torch.randn(6, 5), torch.randint(0, 3, (6,))))
    task = get_task("classification", model)
    params = trainable_params(model)
    batch = next(iter(make_loader(ds, task.collate, batch_size=6)))
    fast = per_sample_grad_norms(model, task, batch.data, params, method="factored")
    assert_float32_close(fast, _loop_norms(model, task, ds, set(params)))  # the bug was a factor up to 2
    grads = per_sample_gradients(model, task, ds, scope="all", batch_size=6)
    ref = per_sample_gradients(model, task, ds, scope="all", batch_size=6, method="func")
    assert_float32_close(grads, ref)
