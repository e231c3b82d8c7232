"""The seq2seq adapter: shifted decoder inputs, label-token units, auto for T5 / Whisper configs, the contract."""

import pytest
import torch

from erasus_ray.data import make_loader
from erasus_ray.tasks import get_task
from erasus_ray.tasks.seq2seq import Seq2SeqTask
from erasus_ray.testing import build_family, check_task


def test_decoder_inputs_are_labels_shifted_behind_the_start_token():
    task = Seq2SeqTask(pad_token_id=0, decoder_start_token_id=5)
    data = task.collate([{"input_ids": [7, 8, 9], "labels": [-100, 4, 1]}, {"input_ids": [6], "labels": [2, 1]}])
    assert data["decoder_input_ids"].tolist() == [[5, 0, 4], [5, 2, 1]]  # an unsupervised -100 label -> pad id
    assert data["labels"].tolist() == [[-100, 4, 1], [2, 1, -100]]
    assert data["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_loss_is_mean_cross_entropy_over_label_tokens():
    fam = build_family("t5")
    batch = next(iter(make_loader(fam.forget, fam.task.collate, batch_size=4)))
    logits = fam.model(**fam.task.model_inputs(batch.data)[1]).logits
    labels = batch.data["labels"]
    expected = [torch.nn.functional.cross_entropy(logits[r][labels[r] != -100], labels[r][labels[r] != -100]) for r in range(4)]
    torch.testing.assert_close(fam.task.per_sample_loss(fam.model, batch.data), torch.stack(expected))
    assert check_task(fam.task, fam)["checked"] == ["loss", "independent", "logits", "features"]


@pytest.mark.parametrize("kind", ["t5", "whisper"])
def test_auto_picks_seq2seq_for_encoder_decoder_models(kind):
    if kind == "t5":
        from transformers import T5Config, T5ForConditionalGeneration

        model = T5ForConditionalGeneration(T5Config(vocab_size=16, d_model=8, d_kv=4, d_ff=8, num_layers=1, num_heads=2,
                                                    decoder_start_token_id=0))
        start = 0
    else:
        from transformers import WhisperConfig, WhisperForConditionalGeneration

        model = WhisperForConditionalGeneration(WhisperConfig(
            vocab_size=40, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16, num_mel_bins=4, max_source_positions=8,
            max_target_positions=16, pad_token_id=0, decoder_start_token_id=3, bos_token_id=3, eos_token_id=1))
        start = 3
    task = get_task("auto", model)
    assert isinstance(task, Seq2SeqTask) and task.decoder_start_token_id == start
    if kind == "whisper":
        data = task.collate([{"input_features": torch.randn(4, 16), "labels": [5, 6, 1]},
                             {"input_features": torch.randn(4, 16), "labels": [7, 1]}])
        assert task.per_sample_loss(model, data).shape == (2,) and task.features(model, data).shape == (2, 16)
