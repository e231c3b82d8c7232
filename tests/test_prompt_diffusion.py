"""Prompt-conditioned (Stable-Diffusion shaped) diffusion: the adapter against hand computations with the UNet and
text encoder called directly, ESD-x / ESD-u parameter sets and ESD's target on the prompt model, UCE's edit against
an independent least-squares solution, and clear errors on bad input.

Default-suite tests use a random-init tiny model (UNet channels 8/16, text width 16); the effect test on the
``digits_prompt_diffusion`` benchmark (two trained UNets, cached) is slow."""

import copy
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import TensorDataset

pytest.importorskip("diffusers")

from erasus_ray import ErasusUnlearner  # noqa: E402
from erasus_ray.data import as_id_dataset, make_loader  # noqa: E402
from erasus_ray.errors import InvalidConfigError, TaskMismatchError  # noqa: E402
from erasus_ray.strategies.esd import esd_target  # noqa: E402
from erasus_ray.strategies.uce import aligned_tokens  # noqa: E402
from erasus_ray.tasks import CapabilityError, get_task  # noqa: E402
from erasus_ray.tasks.diffusion import DiffusionTask  # noqa: E402
from erasus_ray.tasks.prompt_diffusion import PromptDiffusionModel, PromptDiffusionTask  # noqa: E402
from erasus_ray.testing._family import digits  # noqa: E402
from erasus_ray.testing.families.digits_prompt_unet import tiny_prompt_model  # noqa: E402
from erasus_ray.testing.families.digits_unet import tiny_unet  # noqa: E402

THREE = "a handwritten three"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return tiny_prompt_model().eval()


@pytest.fixture(scope="module")
def data():
    x, y = digits()
    return as_id_dataset(TensorDataset(x[:40].reshape(-1, 1, 8, 8) * 2 - 1, y[:40]))


def _batch(task, dataset, size=8):
    return next(iter(make_loader(dataset, task.collate, batch_size=size)))


def _split(dataset, k):
    return {"forget_data": dataset.subset(dataset.ids[:k]), "retain_data": dataset.exclude(dataset.ids[:k])}


def _text(model, prompts):
    ids = model.tokenizer(prompts, padding="max_length", max_length=model.tokenizer.model_max_length,
                          truncation=True, return_tensors="pt").input_ids
    return model.text_encoder(ids)[0]


def test_auto_finds_the_prompt_model_and_the_pipeline_shape(model):
    task = get_task("auto", model)
    assert isinstance(task, PromptDiffusionTask) and task.num_classes == 10 and task.templates == 3
    assert isinstance(get_task("diffusion", model), PromptDiffusionTask)
    pipe = SimpleNamespace(unet=model.unet, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                           scheduler=model.scheduler, vae=None)  # a StableDiffusionPipeline's parts
    assert isinstance(get_task("auto", pipe, class_prompts=model.class_prompts), PromptDiffusionTask)
    wrapped = PromptDiffusionModel.from_pipeline(pipe)
    assert wrapped.unet is model.unet and isinstance(get_task("auto", wrapped, class_prompts=["x"] * 2), PromptDiffusionTask)
    assert not any(p.requires_grad for p in wrapped.text_encoder.parameters())  # only the UNet is ever edited


def test_prompt_conditioning_equals_the_unet_on_its_prompts_text_states(model, data):
    task = get_task("auto", model, draws=3)
    batch = _batch(task, data).data
    assert batch["cond"].shape == (8, 3)
    x_t, t = task.noised(batch)
    # draw d of a sample reads template d mod 3 of its class's prompts
    prompts = [model.class_prompts[int(y)][d] for y in batch["y"] for d in range(3)]
    with torch.no_grad():
        pred = model.unet(x_t, t, encoder_hidden_states=_text(model, prompts)).sample
        by_hand = (pred - batch["noise"].reshape(pred.shape)).pow(2).reshape(8, -1).mean(1)
        torch.testing.assert_close(task.per_sample_loss(model, batch), by_hand)
        threes = torch.full((len(t),), 3)
        torch.testing.assert_close(task.predict_noise(model, x_t, t, threes),
                                   model.unet(x_t, t, encoder_hidden_states=_text(model, [THREE] * len(t))).sample)
        null = task.predict_noise(model, x_t, t, task.null_labels(threes))
        torch.testing.assert_close(null, model.unet(x_t, t, encoder_hidden_states=_text(model, [""] * len(t))).sample)
    dropped = task.training_task()
    dropped.label_dropout = 1.0
    cond = _batch(dropped, data).data["cond"]
    assert (task.prompt_table[cond] == task.prompt_table[task.null_class]).all()  # prompt dropout: the empty prompt


def test_esd_target_on_the_prompt_model_equals_a_hand_computation(model, data):
    task = get_task("auto", model, draws=2)
    batch = _batch(task, data, 4).data
    x_t, t = task.noised(batch)
    c = torch.full((len(t),), 3)
    with torch.no_grad():
        e_c = model.unet(x_t, t, encoder_hidden_states=_text(model, [THREE] * len(t))).sample
        e_0 = model.unet(x_t, t, encoder_hidden_states=_text(model, [""] * len(t))).sample
    torch.testing.assert_close(esd_target(task, model, x_t, t, c, 0.7), e_0 - 0.7 * (e_c - e_0))


@pytest.mark.parametrize("variant", ["x", "u"])
def test_esd_x_changes_only_cross_attention_and_esd_u_none_of_it(model, data, variant):
    task = get_task("auto", model, draws=1)
    result = ErasusUnlearner(copy.deepcopy(model), strategy="esd", selector=None, fraction=None, task=task, seed=0,
                             progress=False, max_steps=2, lr=1e-2, batch_size=8, variant=variant,
                             concept=THREE).fit(**_split(data, 8))
    before, after = dict(model.named_parameters()), dict(result.model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    cross = {n for n in before if ".attn2." in n}
    assert cross and changed and not any(n.startswith("text_encoder.") for n in changed)
    if variant == "x":
        assert changed <= cross, sorted(changed - cross)
    else:
        assert not changed & cross, sorted(changed & cross)


def test_esd_x_defaults_to_its_own_learning_rate_and_an_explicit_one_wins(model, data):
    """ESD-x trains only cross-attention: its default lr is ESD_X_DEFAULT_LR, ESD-u keeps the class default."""
    from erasus_ray.strategies.esd import ESD, ESD_X_DEFAULT_LR

    def lr(**kw):
        unlearner = ErasusUnlearner(copy.deepcopy(model), strategy="esd", selector=None, fraction=None, progress=False,
                                    task=get_task("auto", model), **kw)
        return unlearner.runner_config(data, None).lr

    assert ESD_X_DEFAULT_LR != ESD.default_lr
    assert lr(variant="x") == ESD_X_DEFAULT_LR and lr(variant="u") == ESD.default_lr == lr()
    assert lr(variant="x", lr=5e-5) == 5e-5


def test_uce_edit_equals_an_independent_least_squares_solution(model, data):
    task = PromptDiffusionTask(model.tokenizer, [p[:1] for p in model.class_prompts])  # one prompt per class
    lamb, keep = 0.5, "a handwritten one"
    result = ErasusUnlearner(copy.deepcopy(model), strategy="uce", selector=None, fraction=None, task=task,
                             progress=False, concepts=[THREE], preserve=[keep], lamb=lamb).fit(
        **_split(data, 4))
    with torch.no_grad():
        states = _text(model, [THREE, "", keep]).double()
    # "<bos> a handwritten three <eos> <pad>..": the concept's tokens from "three" (position 3) on, paired with the
    # empty prompt's from <bos> (position 0) on; the preserved prompt's from "one" on, paired with themselves
    n = states.shape[1] - 3
    c, c_star, p = states[0, 3:3 + n], states[1, :n], states[2, 3:]
    edited = dict(result.model.named_modules())
    checked = 0
    for name, module in model.named_modules():
        if name.endswith("attn2"):
            for proj in ("to_k", "to_v"):
                w_old = getattr(module, proj).weight.detach().double()
                eye = torch.eye(w_old.shape[1], dtype=torch.float64)
                # min ||A W^T - B||: rows c (-> W_old c*), p (-> W_old p), sqrt(lamb) I (-> sqrt(lamb) W_old^T)
                a = torch.cat([c, p, lamb ** 0.5 * eye])
                b = torch.cat([c_star @ w_old.T, p @ w_old.T, lamb ** 0.5 * w_old.T])
                expected = torch.linalg.lstsq(a, b).solution.T
                got = getattr(edited[name], proj).weight.detach().double()
                torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
                assert (got - w_old).abs().max() > 1e-3  # it did edit
                checked += 1
    assert checked == 8
    assert aligned_tokens(states[0], torch.tensor([1] * 5 + [0] * 3), states[1], torch.tensor([1] * 2 + [0] * 6))[0].shape[0] == n


def test_cross_attention_methods_refuse_a_class_conditional_model(data):
    unet = tiny_unet()
    task = DiffusionTask(num_class_embeds=11)
    for strategy, kwargs in (("uce", {}), ("esd", {"variant": "x"})):
        with pytest.raises(CapabilityError, match="text_condition"):
            ErasusUnlearner(copy.deepcopy(unet), strategy=strategy, selector=None, fraction=None, task=task,
                            progress=False, max_steps=1, **kwargs).fit(**_split(data, 4))


def test_bad_input_gets_clear_errors(model, data):
    from diffusers import DDPMScheduler

    fit = dict(**_split(data, 4))
    kwargs = dict(selector=None, fraction=None, progress=False, max_steps=1)
    for strategy, key in (("uce", "concepts"), ("esd", "concept")):
        with pytest.raises(InvalidConfigError, match="unknown concept 'a handwritten dragon'"):
            ErasusUnlearner(copy.deepcopy(model), strategy=strategy, **kwargs,
                            **{key: "a handwritten dragon"}).fit(**fit)
    with pytest.raises(InvalidConfigError, match="class-conditional"):  # a prompt given to a class-conditional model
        ErasusUnlearner(tiny_unet(), strategy="esd", task=DiffusionTask(num_class_embeds=11), concept=THREE,
                        **kwargs).fit(**fit)
    v_pred = PromptDiffusionModel(model.unet, model.text_encoder, model.tokenizer,
                                  DDPMScheduler(prediction_type="v_prediction"), class_prompts=model.class_prompts)
    with pytest.raises(TaskMismatchError, match="epsilon"):
        get_task("auto", v_pred)
    with pytest.raises(TaskMismatchError, match="add_noise"):
        get_task("auto", model, scheduler=object())
    with pytest.raises(InvalidConfigError, match="class_prompts"):
        PromptDiffusionTask(model.tokenizer, None)
    with pytest.raises(InvalidConfigError, match="class_prompts"):
        PromptDiffusionTask(model.tokenizer, [["a", "b"], ["c"]])


def test_a_latent_model_samples_latents_and_decodes_them_with_its_vae(model):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=4,
                        norm_num_groups=4, layers_per_block=1)
    unet = UNet2DConditionModel(sample_size=4, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=4, norm_num_groups=4)
    latent = PromptDiffusionModel(unet, model.text_encoder, model.tokenizer, model.scheduler, vae=vae,
                                  class_prompts=model.class_prompts)
    task = get_task("auto", latent, sample_steps=2)
    images = torch.rand(2, 1, 8, 8) * 2 - 1
    latents = latent.encode_images(images)
    assert latents.shape == (2, 4, 4, 4)  # the items of a latent model
    out = task.sample(latent, torch.tensor([3, 3]), seed=0)
    raw, _ = task.partial_sample(latent, torch.tensor([3, 3]), seed=0)
    with torch.no_grad():
        torch.testing.assert_close(out, vae.decode(raw / vae.config.scaling_factor).sample)
    assert out.shape == (2, 1, 8, 8)


@pytest.mark.slow
def test_uce_and_esd_x_erase_the_prompt_towards_gold_on_the_default_prompt_benchmark():
    """digits_prompt_diffusion defaults (channels 16/32, 60 epochs, cached; ~6 CPU-minutes to train both UNets),
    judged from 32 seeded DDIM samples per class: UCE with its defaults takes "a handwritten three" from 0.97 to 0.06
    (gold 0.00) while the other classes go 0.94 -> 0.90; ESD-x with its defaults (lr 1e-3, 15 steps) to 0.00 with
    the others at 0.91 (0.913: seed-0 row of benchmarks/diffusion/prompt_leaderboard.csv, same 32 images per class;
    bound for both: rate <= 0.2, a drop of at most 0.08 in the others). Seed 0 only: on seeds 1-2 ESD-x's others
    fall to 0.57 / 0.74 and UCE leaves seed 2 at 0.34 (RESULTS.md, prompt 3-seed leaderboard)."""
    from erasus_ray.benchmarks import load_benchmark
    from erasus_ray.evaluation.diffusion import generation_rate

    bench = load_benchmark("digits_prompt_diffusion", seed=0, gold=False)
    assert bench.gold is None

    def rates(model):
        r = [generation_rate(bench.task, model, c, n=32) for c in range(10)]
        return r[3], sum(x for c, x in enumerate(r) if c != 3) / 9

    orig_rate, orig_others = rates(bench.original)
    assert orig_rate > 0.8
    for strategy, kw in (("uce", {}), ("esd", {"variant": "x"})):
        edited = ErasusUnlearner(copy.deepcopy(bench.original), strategy=strategy, selector=None, fraction=None,
                                 task=bench.task, progress=False, **kw).fit(forget_data=bench.forget,
                                                                             retain_data=bench.retain).model
        rate, others = rates(edited)
        assert rate <= 0.2 and others >= orig_others - 0.08, (strategy, orig_rate, orig_others, rate, others)
