"""The class-erasure methods for diffusion models beyond ESD and concept ablation: Selective Amnesia, SalUn's
diffusion path, noise injection (EraseDiff), U-Net surgery (Scissorhands), timestep masking, meta-unlearning and Safe
Latent Diffusion. Each one's defining computation against a hand computation on the tiny 'digits_unet' family (fast),
then, slow, each method's defaults on digits_diffusion against the gold model, and Ray Train running the loss-based
diffusion strategies."""

import copy

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from erasus_ray import ErasusUnlearner  # noqa: E402
from erasus_ray.data import make_loader  # noqa: E402
from erasus_ray.errors import TaskMismatchError  # noqa: E402
from erasus_ray.strategies.base import UnlearnContext  # noqa: E402
from erasus_ray.strategies.esd import esd_target  # noqa: E402
from erasus_ray.strategies.meta_unlearning import AtWeights, MetaUnlearning, relearned_weights  # noqa: E402
from erasus_ray.strategies.noise_injection import NoiseInjection  # noqa: E402
from erasus_ray.strategies.safe_latents import SafeLatentsModel  # noqa: E402
from erasus_ray.strategies.saliency_unlearning import forget_gradient, saliency_mask  # noqa: E402
from erasus_ray.strategies.selective_amnesia import SelectiveAmnesia, ewc_penalty  # noqa: E402
from erasus_ray.strategies.timestep_masking import TimestepMasking, masked_timesteps  # noqa: E402
from erasus_ray.strategies.unet_surgery import UNetSurgery, connection_sensitivity, guidance_gradient, project_out  # noqa: E402
from erasus_ray.testing import build_family  # noqa: E402
from erasus_ray.testing.families.digits_unet import FORGET_CLASS  # noqa: E402

NEW_METHODS = ["selective_amnesia", "saliency_unlearning", "noise_injection", "unet_surgery", "timestep_masking",
               "meta_unlearning", "safe_latents"]


@pytest.fixture(scope="module")
def family():
    return build_family("digits_unet")


def _ctx(family, model=None, **kw):
    return UnlearnContext(model=model if model is not None else copy.deepcopy(family.model), task=family.task,
                          forget=family.forget, retain=family.retain, device=torch.device("cpu"), seed=0, **kw)


def _batch(family, data, size=4):
    return next(iter(make_loader(data, family.task.collate, batch_size=size)))


def test_selective_amnesia_uses_the_original_models_fisher_and_replays_its_samples(family):
    task, original = family.task, family.model
    ctx = _ctx(family)
    strategy = SelectiveAmnesia(replay_images=6, fisher_samples=3)
    strategy.setup(ctx)
    # replay: the frozen original's own samples of the kept classes (classes in turn, the run's seed)
    images, labels = ctx.state["sa_replay"]
    kept = [c for c in range(10) if c != FORGET_CLASS]
    assert labels.tolist() == kept[:6]
    torch.testing.assert_close(images, task.sample(original, labels, seed=0))
    # Fisher: the squared per-sample gradient of the original's denoising loss, by hand, over its samples of all classes
    every = torch.arange(3)
    generated = task.sample(original, every, seed=0)
    model = copy.deepcopy(original)
    by_hand = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for row in range(3):
        data = task.collate([(generated[row], row)], ids=torch.tensor([row]))
        model.zero_grad()
        task.per_sample_loss(model.eval(), data).sum().backward()
        for n, p in model.named_parameters():
            by_hand[n] += p.grad.pow(2) / 3
    for n, f in ctx.state["sa_fisher"].items():
        torch.testing.assert_close(f, by_hand[n], rtol=1e-4, atol=1e-12)
    assert sum(float(f.sum()) for f in by_hand.values()) > 0
    # EWC: zero at the original weights, sum F (theta - theta*)^2 once they move
    assert float(ewc_penalty(ctx.model, ctx.state["sa_fisher"], ctx.state["sa_anchor"]).detach()) == 0.0
    with torch.no_grad():
        for p in ctx.model.parameters():
            p.add_(0.01)
    expected = sum(float(f.sum()) * 1e-4 for f in ctx.state["sa_fisher"].values())
    assert float(ewc_penalty(ctx.model, ctx.state["sa_fisher"], ctx.state["sa_anchor"]).detach()) == pytest.approx(expected, rel=1e-3)
    _, logs = strategy.loss(ctx, _batch(family, family.forget), None)
    assert float(logs["ewc"]) == pytest.approx(expected, rel=1e-3) and float(logs["surrogate_loss"]) > 0


def test_salun_diffusion_path_moves_only_salient_weights_and_remaps_the_class(family):
    mask = saliency_mask(forget_gradient(family.model, family.task, family.forget), 0.5)
    result = ErasusUnlearner(copy.deepcopy(family.model), strategy="saliency_unlearning", selector=None, fraction=None,
                             task=family.task, seed=0, progress=False, max_steps=3, lr=1e-3, batch_size=8).fit(
        forget_data=family.forget, retain_data=family.retain)
    before, after = dict(family.model.named_parameters()), dict(result.model.named_parameters())
    moved = {n: (before[n] != after[n]) for n in before}
    assert all(not bool((moved[n] & ~mask[n]).any()) for n in before), "a weight outside the saliency mask moved"
    assert sum(int(m.sum()) for m in moved.values()) > 0.2 * sum(int(m.sum()) for m in mask.values())
    assert "forget_remap_loss" in result.report.history[-1] or result.report.steps == 3


def test_salun_defaults_to_its_diffusion_epochs_on_a_diffusion_task_only(family):
    """The runner's default epochs follow the task the strategy was checked against: 10 on the diffusion path (50
    steps erase the class, measured), the classifier path's 30 on a task with logits; an explicit value wins."""
    from erasus_ray.strategies.saliency_unlearning import SaliencyUnlearning

    def epochs(model, task, **kw):
        return ErasusUnlearner(model, strategy="saliency_unlearning", selector=None, fraction=None, task=task,
                               progress=False, **kw).runner_config(family.forget, None).epochs

    assert SaliencyUnlearning.diffusion_epochs < SaliencyUnlearning.default_epochs
    assert epochs(copy.deepcopy(family.model), family.task) == SaliencyUnlearning.diffusion_epochs
    assert epochs(torch.nn.Linear(64, 10), "classification") == SaliencyUnlearning.default_epochs
    assert epochs(copy.deepcopy(family.model), family.task, epochs=2) == 2


def test_salun_remap_target_is_another_classes_prediction(family):
    from erasus_ray.strategies.saliency_unlearning import SaliencyUnlearning

    ctx = _ctx(family)
    forget = _batch(family, family.forget)
    loss, _ = SaliencyUnlearning().remap_loss(ctx, forget)
    # give every class the erased class's embedding: its prediction then equals every other class's, the loss is 0
    with torch.no_grad():
        ctx.model.class_embedding.weight[:10] = ctx.model.class_embedding.weight[FORGET_CLASS]
    matched, _ = SaliencyUnlearning().remap_loss(ctx, forget)
    assert float(loss.detach()) > 1e-5 and float(matched.detach()) < 1e-12


def test_noise_injection_regresses_the_forget_prediction_onto_uniform_noise(family):
    from erasus_ray.strategies._diffusion import step_generator

    ctx = _ctx(family)
    forget = _batch(family, family.forget)
    loss, logs = NoiseInjection(alpha=0.0).loss(ctx, forget, None)
    task, data = family.task, forget.data
    injected = torch.rand(data["noise"].shape, generator=step_generator(ctx))  # U[0, 1), the step's seeded draw
    x_t, t = task.noised(data)
    with torch.no_grad():
        pred = ctx.model(x_t, t, class_labels=task.draw_labels(data)).sample
    by_hand = (pred - injected.reshape(pred.shape)).pow(2).reshape(4, -1).mean(1).mean()
    torch.testing.assert_close(loss.detach(), by_hand)


def test_unet_surgery_trims_the_most_sensitive_weights_and_projects_the_repair(family):
    ctx = _ctx(family)
    # the sensitivity of the erased class's guidance term ||eps(x_t, c) - eps(x_t, null)||^2, by hand
    model = copy.deepcopy(family.model).eval()
    task = family.task
    data = _batch(family, family.forget, len(family.forget)).data
    x_t, t = task.noised(data)
    c = task.draw_labels(data)
    gap = model(x_t, t, class_labels=c).sample - model(x_t, t, class_labels=torch.full_like(c, 10)).sample
    gap.pow(2).reshape(len(family.forget), -1).mean(1).mean().backward()
    scores = {n: (p.grad * p.detach()).abs() for n, p in model.named_parameters()}
    torch.testing.assert_close(connection_sensitivity(family.model, guidance_gradient(_ctx(family))), scores)
    UNetSurgery(trim_fraction=0.01).setup(ctx)
    flat = torch.cat([s.flatten() for s in scores.values()])
    k = int(np.ceil(0.01 * flat.numel()))
    cut = torch.topk(flat, k).values.min()
    for n, p in ctx.model.named_parameters():
        trimmed = (p == 0) & (dict(family.model.named_parameters())[n] != 0)
        assert torch.equal(trimmed, scores[n] >= cut) or int((trimmed != (scores[n] >= cut)).sum()) <= 1, n
    assert ctx.state["surgery_trimmed"] == k
    # the projection removes a positive component along the forget gradient and leaves a negative one alone
    g, d = {"w": torch.tensor([1.0, 1.0])}, {"w": torch.tensor([1.0, 0.0])}
    assert project_out(g, d) == 1.0 and torch.equal(g["w"], torch.tensor([0.0, 1.0]))
    g = {"w": torch.tensor([-1.0, 1.0])}
    assert project_out(g, d) == 0.0 and torch.equal(g["w"], torch.tensor([-1.0, 1.0]))


def test_timestep_masking_trains_only_inside_its_window(family):
    t = torch.arange(1000)
    mapped = masked_timesteps(t, 300, 1000, 1000)
    assert int(mapped.min()) == 300 and int(mapped.max()) == 999 and bool((mapped.diff() >= 0).all())
    assert torch.bincount(mapped - 300).max() <= 2  # uniform on the window
    ctx = _ctx(family)
    strategy = TimestepMasking(window=(0.5, 0.6))
    strategy.setup(ctx)
    forget = _batch(family, family.forget)
    loss, _ = strategy.loss(ctx, forget, None)
    task = family.task
    data = {**forget.data, "t": 500 + forget.data["t"] * 100 // 1000}
    x_t, tt = task.noised(data)
    c = task.draw_labels(data)
    with torch.no_grad():
        by_hand = (ctx.model(x_t, tt, class_labels=c).sample - esd_target(task, family.model, x_t, tt, c, 1.0)).pow(2).mean()
    torch.testing.assert_close(loss.detach(), by_hand)
    # the preservation term: alpha x the retain batch's ordinary denoising loss, on top of the masked ESD loss
    retain = _batch(family, family.retain)
    total, logs = TimestepMasking(window=(0.5, 0.6), alpha=2.0).loss(ctx, forget, retain)
    with torch.no_grad():
        retain_by_hand = task.per_sample_loss(ctx.model, retain.data).mean()
    torch.testing.assert_close(logs["retain_loss"], retain_by_hand)
    torch.testing.assert_close(total.detach(), by_hand + 2.0 * retain_by_hand)
    assert TimestepMasking().needs_retain and not TimestepMasking(alpha=0.0).needs_retain


def test_meta_unlearning_adds_the_esd_loss_after_a_simulated_relearning_step(family):
    ctx = _ctx(family)
    strategy = MetaUnlearning(gamma=1.0, relearn_lr=0.05)
    strategy.setup(ctx)
    forget = _batch(family, family.forget)
    # the simulated step by hand: theta - lr * grad of the forget batch's denoising loss
    model = ctx.model
    model.zero_grad()
    family.task.per_sample_loss(model, forget.data).mean().backward()
    stepped = relearned_weights(ctx, forget, 0.05)
    for n, p in model.named_parameters():
        torch.testing.assert_close(stepped[n], p - 0.05 * p.grad)
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in moved.named_parameters():
            p.copy_(stepped[n])
    total, logs = strategy.loss(ctx, forget, None)
    torch.testing.assert_close(logs["meta_loss"], strategy.esd_loss(ctx, moved, forget).detach())
    torch.testing.assert_close(total.detach(), logs["esd_loss"] + logs["meta_loss"])
    assert abs(float(logs["meta_loss"]) - float(logs["esd_loss"])) > 1e-7  # the relearning step changes the term
    # the meta term's gradient reaches theta (first order: through the replaced weights)
    model.zero_grad()
    strategy.esd_loss(ctx, AtWeights(model, relearned_weights(ctx, forget, 0.05)), forget).backward()
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in model.parameters())


def test_safe_latents_folds_sld_guidance_into_the_conditional_prediction(family):
    task, base = family.task, family.model
    result = ErasusUnlearner(copy.deepcopy(base), strategy="safe_latents", selector=None, fraction=None, task=task,
                             progress=False, momentum_scale=0.5).fit(forget_data=family.forget, retain_data=family.retain)
    wrapped = result.model
    assert isinstance(wrapped, SafeLatentsModel) and result.report.steps == 0
    assert all(torch.equal(p, q) for p, q in zip(wrapped.base.parameters(), base.parameters()))  # no weight changed
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.full((4,), 500)
    labels = torch.tensor([FORGET_CLASS, FORGET_CLASS, 10, 5])
    with torch.no_grad():
        out = wrapped(x, t, class_labels=labels)
        eps = lambda c: base(x, t, class_labels=torch.full((4,), c)).sample  # noqa: E731
        e_s, e_u, e_5 = eps(FORGET_CLASS), eps(10), eps(5)
    # a request of the erased class: eps_u - (eps_S - eps_u) (mu = 1 everywhere, momentum fixed point 2x)
    torch.testing.assert_close(out[:2], (e_s - 2 * (e_s - e_u))[:2], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[2], e_u[2])  # the null class is the base's
    close = ((e_5 - e_s).abs() < 0.01).float()
    torch.testing.assert_close(out[3], (e_5 - 2 * close * (e_s - e_u))[3], rtol=1e-4, atol=1e-5)
    # the task's guided sampler goes through the wrapper: the erased class's samples change, another class's barely
    a, b = task.sample(base, torch.tensor([FORGET_CLASS] * 4), steps=4), task.sample(wrapped, torch.tensor([FORGET_CLASS] * 4), steps=4)
    assert float((a - b).abs().mean()) > 0.05


@pytest.mark.parametrize("name", NEW_METHODS)
def test_diffusion_methods_refuse_an_unconditional_model(name, family):
    from diffusers import UNet2DModel

    unconditional = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                                norm_num_groups=4, layers_per_block=1)
    with pytest.raises(TaskMismatchError, match="class-conditional"):
        ErasusUnlearner(unconditional, strategy=name, selector=None, fraction=None, task="auto", progress=False,
                        max_steps=1).fit(forget_data=family.forget, retain_data=family.retain)


#: The bounds of tests/test_diffusion.py's effect test (40 judged samples of the erased class, 16 of each other class).
ERASED_RATE_MAX = 0.25
OTHERS_DROP_MAX = 0.15


def _rates(bench, model, forget_class):
    from erasus_ray.evaluation.diffusion import generation_rate

    erased = generation_rate(bench.task, model, forget_class, n=40)
    others = np.mean([generation_rate(bench.task, model, c, n=16) for c in range(10) if c != forget_class])
    return erased, others


@pytest.mark.slow
@pytest.mark.parametrize(("method", "seed"), [(m, 0) for m in NEW_METHODS] + [("timestep_masking", 1)])
def test_new_methods_lower_the_erased_rate_towards_gold_and_keep_the_other_classes(method, seed):
    """On digits_diffusion (class 3, seed 0; cached under ERASUS_RAY_CACHE): each method with its defaults takes the
    erased class's judged generation rate to at most ERASED_RATE_MAX (original ~1.0, gold 0.0) while the other
    classes' judged accuracy stays within OTHERS_DROP_MAX of the gold model's. timestep_masking also on seed 1, where
    its earlier defaults (no retain term) over-erased and took the other classes to 0.76 (bound 0.84)."""
    from erasus_ray.benchmarks import load_benchmark

    bench = load_benchmark("digits_diffusion", seed=seed)
    forget_class = bench.info["forget_class"]
    gold = _rates(bench, bench.gold, forget_class)
    result = ErasusUnlearner(copy.deepcopy(bench.original), strategy=method, selector=None, fraction=None,
                             task=bench.task, seed=seed, progress=False).fit(forget_data=bench.forget, retain_data=bench.retain)
    erased, others = _rates(bench, result.model, forget_class)
    assert erased <= ERASED_RATE_MAX, (method, gold, erased)
    assert others >= gold[1] - OTHERS_DROP_MAX, (method, gold, others)


@pytest.mark.slow
def test_unet_surgery_closed_loop_mends_its_trim_and_verifies():
    """Scissorhands under the closed loop (digits_diffusion seed 0, gold=): its trim breaks the guard until the repair
    mends it. Before the controller measured the edit and let the repair go on, every window tripped and the run
    returned the trimmed UNet (other classes judged 0.27); now it verifies (measured: step 98, rate 0.016, others
    0.957; benchmarks/diffusion/closed_loop.csv) with the other classes within OTHERS_DROP_MAX of the gold model's."""
    from erasus_ray.benchmarks import load_benchmark
    from erasus_ray.control import ControlConfig

    bench = load_benchmark("digits_diffusion", seed=0)
    result = ErasusUnlearner(copy.deepcopy(bench.original), strategy="unet_surgery", selector=None, fraction=None,
                             task=bench.task, seed=0, progress=False,
                             control=ControlConfig(budget_steps=200, budget_seconds=None)).fit(
        forget_data=bench.forget, retain_data=bench.retain, gold=bench.gold)
    v = result.verification
    assert v["mode"] == "closed_loop" and v["target"] == "generation" and result.verified is True, v["stopped"]
    assert not all(c["passed"] for c in v["setup_edit"]["guard"])  # the trim broke the guard; the repair mended it
    erased, others = _rates(bench, result.model, bench.info["forget_class"])
    gold = _rates(bench, bench.gold, bench.info["forget_class"])
    assert erased <= ERASED_RATE_MAX and others >= gold[1] - OTHERS_DROP_MAX, (erased, others, gold)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["grad_diff", "esd", "selective_amnesia"])
def test_ray_train_runs_the_loss_based_diffusion_strategies_like_the_local_runner(name, family, ray_cluster):
    """backend='ray_train' with one worker takes the same steps on a DiffusionTask as the local runner (id-keyed
    draws travel with the batches; ESD's frozen reference and SA's Fisher are built in the worker's setup).
    gradient_ascent is grad_diff's forget term alone, so grad_diff (forget and retain batches) covers its path."""
    kw = dict(strategy=name, selector=None, fraction=None, task=family.task, seed=0, progress=False, max_steps=3,
              lr=1e-3, batch_size=8)
    local = ErasusUnlearner(copy.deepcopy(family.model), **kw).fit(forget_data=family.forget, retain_data=family.retain)
    remote = ErasusUnlearner(copy.deepcopy(family.model), backend="ray_train", num_workers=1, **kw).fit(
        forget_data=family.forget, retain_data=family.retain)
    assert remote.report.steps == local.report.steps == 3
    for (n, a), b, o in zip(local.model.state_dict().items(), remote.model.state_dict().values(),
                            family.model.state_dict().values()):
        torch.testing.assert_close(b, a, atol=2e-5, rtol=0, msg=n)
    assert any(not torch.equal(a, o) for a, o in zip(remote.model.state_dict().values(), family.model.state_dict().values()))


def test_per_sample_gradients_leave_the_task_picklable(family):
    """gradient_norm runs the denoising loss inside torch.func transforms; diffusers' add_noise caches its tables on
    the scheduler, which used to leave a functorch wrapper on the task's scheduler: the task no longer pickled (the Ray
    scoring pool refused it) and the table was not a plain tensor any more."""
    import pickle

    from erasus_ray.selectors import get_selector

    task = copy.deepcopy(family.task)
    get_selector("gradient_norm").select(family.model, family.forget, task=task, fraction=0.25, seed=0)
    assert type(task.scheduler.alphas_cumprod) is torch.Tensor
    restored = pickle.loads(pickle.dumps(task))
    torch.testing.assert_close(restored.scheduler.alphas_cumprod, family.task.scheduler.alphas_cumprod)
