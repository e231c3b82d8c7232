"""Tiny Hugging Face audio models built from configs, on synthetic spoken "words" generated here with a seed (1-3 s
each, both 100% on held-out utterances): ``wav2vec2`` (``Wav2Vec2ForSequenceClassification`` on raw waveforms
``input_values [B, T]``, through the classification adapter) and ``whisper`` (``WhisperForConditionalGeneration`` transcribing log-spectrogram frames
``input_features [B, mels, frames]`` into the word's tokens, through the seq2seq adapter).

A word is a chord of two class-specific tones (random phase, amplitude and noise per utterance), 400 samples long;
its transcript is two tokens and an end token. Synthetic tones, not speech: they exercise the input shapes and the
adapters, not acoustic modelling.
"""

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from erasus_ray.tasks.classification import ClassificationTask
from erasus_ray.tasks.seq2seq import Seq2SeqTask
from erasus_ray.testing._family import Family, register_family, seeded, trained_family
from erasus_ray.training import TrainRecipe

WORDS, SAMPLES, MELS, FRAMES = 4, 400, 12, 16
#: Whisper token ids: pad 0, start of transcript 1, end 2; word ``c`` is ``[3 + 2c, 4 + 2c, 2]``.
PAD, START, END, VOCAB = 0, 1, 2, 3 + 2 * WORDS


def tone_words(n: int = 240, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(waves [n, SAMPLES] float32, words [n] int64)``: word ``c`` sounds tones at cycles-per-sample
    ``0.03 (c + 1)`` and ``0.02 (c + 1) + 0.25``, with a random phase and amplitude and Gaussian noise (std 0.3)."""
    rng = np.random.default_rng(seed)
    words = rng.integers(0, WORDS, n)
    t = np.arange(SAMPLES)
    freqs = np.stack([0.03 * (words + 1), 0.02 * (words + 1) + 0.25], 1)[:, :, None]
    phase = rng.uniform(0, 2 * np.pi, (n, 2, 1))
    amp = rng.uniform(0.5, 1.0, (n, 2, 1))
    waves = (amp * np.sin(2 * np.pi * freqs * t + phase)).sum(1) + rng.normal(0, 0.3, (n, SAMPLES))
    return torch.tensor(waves, dtype=torch.float32), torch.tensor(words, dtype=torch.long)


def log_spectrogram(waves: torch.Tensor) -> torch.Tensor:
    """``[n, MELS, FRAMES]`` log-magnitude spectrogram: FRAMES frames of 25 samples, the MELS non-constant bins of
    each frame's rfft (Whisper's input layout, with linear bands instead of mel ones)."""
    frames = waves.reshape(len(waves), FRAMES, -1)
    bands = torch.fft.rfft(frames, dim=-1).abs()[..., 1:MELS + 1]  # drop the DC bin
    return torch.log1p(bands).transpose(1, 2).contiguous()


class Utterances(Dataset):
    """``(wave [SAMPLES], word)`` for the classifier, or Whisper items ``{"input_features", "labels"}``."""

    def __init__(self, transcripts: bool, n: int = 240, seed: int = 0) -> None:
        self.waves, self.words = tone_words(n, seed)
        self.features = log_spectrogram(self.waves) if transcripts else None

    def __len__(self) -> int:
        return len(self.words)

    def __getitem__(self, i: int):
        c = int(self.words[i])
        if self.features is None:
            return self.waves[i], c
        return {"input_features": self.features[i], "labels": torch.tensor([3 + 2 * c, 4 + 2 * c, END])}


def tiny_wav2vec2() -> nn.Module:
    """An untrained ``Wav2Vec2ForSequenceClassification``: two strided convolutions (x16 downsampling), one layer."""
    from transformers import Wav2Vec2Config, Wav2Vec2ForSequenceClassification

    cfg = Wav2Vec2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                         conv_dim=(16, 16), conv_stride=(4, 4), conv_kernel=(8, 4), num_conv_pos_embeddings=4,
                         num_conv_pos_embedding_groups=2, num_labels=WORDS, classifier_proj_size=16,
                         mask_time_prob=0.0, layerdrop=0.0, hidden_dropout=0.0, attention_dropout=0.0,
                         activation_dropout=0.0, feat_proj_dropout=0.0, final_dropout=0.0)
    return Wav2Vec2ForSequenceClassification(cfg)


def tiny_whisper() -> nn.Module:
    """An untrained ``WhisperForConditionalGeneration``: one encoder and one decoder layer, 16 wide."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    cfg = WhisperConfig(vocab_size=VOCAB, num_mel_bins=MELS, encoder_layers=1, decoder_layers=1,
                        encoder_attention_heads=2, decoder_attention_heads=2, d_model=16, encoder_ffn_dim=32,
                        decoder_ffn_dim=32, max_source_positions=FRAMES // 2, max_target_positions=8, pad_token_id=PAD,
                        bos_token_id=START, eos_token_id=END, decoder_start_token_id=START, suppress_tokens=None,
                        begin_suppress_tokens=None, dropout=0.0)
    return WhisperForConditionalGeneration(cfg)


@register_family("wav2vec2", cheap=False)
def wav2vec2_family() -> Family:
    recipe = TrainRecipe(epochs=15, lr=3e-3, batch_size=32, seed=0)
    return trained_family("wav2vec2", seeded(tiny_wav2vec2), ClassificationTask(), Utterances(False), recipe,
                          n_forget=16, n_test=60, cheap=False, lr=3e-3, batch_size=8)


@register_family("whisper", cheap=False)
def whisper_family() -> Family:
    factory = seeded(tiny_whisper)
    recipe = TrainRecipe(epochs=15, lr=3e-3, batch_size=32, seed=0)
    return trained_family("whisper", factory, Seq2SeqTask.from_model(factory()), Utterances(True), recipe,
                          n_forget=16, n_test=60, cheap=False, lr=3e-3, batch_size=8)
