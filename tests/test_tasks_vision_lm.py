"""The generative vision-language adapter on a tiny Hugging Face Llava (built here): ``task="auto"`` picks it, a
sample's loss is the model's own answer-only loss, answer accuracy is what greedy decoding says, and bad inputs
(images of the wrong size, no image, audio at the wrong sampling rate) fail with errors that name what was expected."""

import pytest
import torch

from erasus_ray.data import make_loader
from erasus_ray.errors import InvalidDataError
from erasus_ray.evaluation import run_metrics
from erasus_ray.tasks import get_task
from erasus_ray.tasks.causal_lm import IGNORE
from erasus_ray.tasks.vision_lm import VisionCausalLMTask
from erasus_ray.testing import build_family
from erasus_ray.testing.families.llava import IMAGE, IMAGE_TOKENS, NAMES, VOCAB, tokenizer

pytest.importorskip("transformers")


def _batch(task, data, n=None):
    n = n or len(data)
    return next(iter(make_loader(data.subset(data.ids[:n]), task.collate, batch_size=n))).data


def test_auto_picks_the_vision_adapter_with_the_placeholder_and_image_shape_from_the_config():
    fam = build_family("llava")
    task = get_task("auto", fam.model)
    assert type(task) is VisionCausalLMTask
    assert task.image_token_id == IMAGE == fam.model.config.image_token_id and task.image_shape == (1, 8, 8)
    assert tokenizer().convert_tokens_to_ids("<image>") == IMAGE and len(tokenizer()) == len(VOCAB)
    from erasus_ray import MultimodalUnlearner

    assert type(MultimodalUnlearner(fam.model, selector=None, fraction=None).task) is VisionCausalLMTask


def test_a_samples_loss_is_the_models_own_loss_with_prompt_and_image_placeholders_masked():
    fam = build_family("llava")
    data = _batch(fam.task, fam.test, 1)
    labels = data["labels"][0]
    placeholders = data["input_ids"][0] == IMAGE
    assert int(placeholders.sum()) == IMAGE_TOKENS and bool((labels[placeholders] == IGNORE).all())
    assert (labels != IGNORE).sum() == 2  # the digit's name and </s>: only the answer is supervised
    with torch.no_grad():
        own = fam.model(input_ids=data["input_ids"], pixel_values=data["pixel_values"], labels=data["labels"]).loss
        ours = fam.task.per_sample_loss(fam.model, data)
    torch.testing.assert_close(ours, own.reshape(1))


def test_answer_accuracy_is_the_fraction_of_greedy_answers_naming_the_digit():
    fam = build_family("llava")
    data = _batch(fam.task, fam.test)
    with torch.no_grad():
        out = fam.task.forward(fam.model, data)
    first = torch.tensor([int((out.owner == row).nonzero()[0]) for row in range(out.batch_size)])
    by_hand = float((out.logits[first].argmax(-1) == out.targets[first]).float().mean())
    measured = run_metrics(fam.model, fam.task, {"test": fam.test}, ["test_exact"])["test_exact"]
    assert measured == pytest.approx(by_hand) and measured >= 0.7  # 0.83 measured; chance 0.1
    assert len(NAMES) == 10


def test_an_image_of_the_wrong_size_or_no_image_fails_naming_the_expected_shape():
    fam = build_family("llava")
    item = dict(fam.test[0][1])
    with pytest.raises(InvalidDataError, match=r"'pixel_values' has shape \(1, 16, 16\).*\(1, 8, 8\)"):
        fam.task.collate([{**item, "pixel_values": torch.zeros(1, 16, 16)}])
    item.pop("pixel_values")
    with pytest.raises(InvalidDataError, match=r"missing 'pixel_values' .*1x8x8"):
        fam.task.collate([item])


def test_a_clip_image_of_the_wrong_size_fails_naming_the_expected_shape():
    fam = build_family("clip")
    image, tokens, label = fam.test[0][1]
    with pytest.raises(InvalidDataError, match=r"'image' has shape \(3, 8, 8\).*\(1, 8, 8\)"):
        fam.task.collate([(torch.zeros(3, 8, 8), tokens, label)])


def test_generation_and_preference_batches_carry_the_image():
    """A rebuilt (prompt + new answer) batch keeps each row's image: the row's new answer is about that image."""
    from erasus_ray.data import Batch
    from erasus_ray.strategies._preference import chosen_batch
    from erasus_ray.strategies.base import UnlearnContext

    fam = build_family("llava")
    data = _batch(fam.task, fam.test, 3)
    ctx = UnlearnContext(fam.model, fam.task, fam.forget, fam.retain, torch.device("cpu"))
    rebuilt = chosen_batch(ctx, Batch(torch.arange(3), data, None), [[5, 2], [6, 2], [7, 2]])
    torch.testing.assert_close(rebuilt.data["pixel_values"], data["pixel_values"])
    assert rebuilt.data["input_ids"][:, -2].tolist() == [5, 6, 7]


def test_audio_at_the_wrong_sampling_rate_fails_naming_the_expected_rate():
    """A Hugging Face datasets audio record at another rate than the model's is refused, not read as another sound."""
    from erasus_ray.tasks.classification import ClassificationTask

    task = ClassificationTask(sampling_rate=16000)
    wave = torch.zeros(400)
    data = task.collate([({"array": wave, "sampling_rate": 16000}, 1), ({"array": wave + 1, "sampling_rate": 16000}, 0)])
    assert tuple(data[0].shape) == (2, 400) and data[1].tolist() == [1, 0]
    with pytest.raises(InvalidDataError, match="sampled at 8000 Hz, but the model expects 16000 Hz"):
        task.collate([({"array": wave, "sampling_rate": 8000}, 1)])
    with pytest.raises(InvalidDataError, match="audio record"):
        task.collate([({"wave": wave}, 1)])
