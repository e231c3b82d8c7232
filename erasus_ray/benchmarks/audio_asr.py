"""``audio_asr``: a tiny Hugging Face ``WhisperForConditionalGeneration`` transcribing the ``audio`` benchmark's
synthetic formant speech (:mod:`~erasus_ray.benchmarks.audio_data`; same utterances, splits and scenarios: forget
speaker ``forget_speaker``, or a random 10%), through the seq2seq adapter.

Input: a log-magnitude spectrogram ``[FREQ_BINS, FRAMES]`` (Whisper's ``input_features`` layout, 10 ms frames with
linear 100 Hz bands instead of mel ones); transcript: the word's token, then end. Each utterance is one word, so its
word error rate (:func:`transcript_wer`, greedy decoding) is 0 or the edits of a wrong / extra-word transcript over
one reference word; a multi-word phrase set is not built.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from erasus_ray.benchmarks.audio import AudioBenchmark
from erasus_ray.benchmarks.audio_data import SAMPLES, WORDS
from erasus_ray.data import IdDataset, make_loader
from erasus_ray.evaluation.asr import word_error_rate
from erasus_ray.tasks import Task
from erasus_ray.tasks.seq2seq import Seq2SeqTask
from erasus_ray.training import TrainRecipe

#: frames of 80 samples (10 ms at 8 kHz) and the rfft bins 1..40 of each (100-4000 Hz)
FRAMES, FREQ_BINS = 40, 40
#: token ids: pad 0, start of transcript 1, end 2, word ``w`` is ``3 + w``
PAD, START, END = 0, 1, 2
VOCAB = 3 + len(WORDS)


def spectrogram(waves: np.ndarray) -> torch.Tensor:
    """``[n, FREQ_BINS, FRAMES]`` log1p magnitude of each 10 ms frame's rfft, DC dropped."""
    frames = torch.as_tensor(waves, dtype=torch.float32).reshape(len(waves), FRAMES, SAMPLES // FRAMES)
    bands = torch.fft.rfft(frames, dim=-1).abs()[..., 1:FREQ_BINS + 1]
    return torch.log1p(bands).transpose(1, 2).contiguous()


class Transcribed(Dataset):
    """Whisper items ``{"input_features": [FREQ_BINS, FRAMES], "labels": [word token, END]}``."""

    def __init__(self, waves: np.ndarray, words: np.ndarray) -> None:
        self.features = spectrogram(waves)
        self.words = torch.as_tensor(words, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.words)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_features": self.features[i], "labels": torch.tensor([3 + int(self.words[i]), END])}


def tiny_speech_whisper() -> nn.Module:
    """An untrained ``WhisperForConditionalGeneration``: two encoder and one decoder layer, 32 wide."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    cfg = WhisperConfig(vocab_size=VOCAB, num_mel_bins=FREQ_BINS, encoder_layers=2, decoder_layers=1,
                        encoder_attention_heads=4, decoder_attention_heads=4, d_model=32, encoder_ffn_dim=64,
                        decoder_ffn_dim=64, max_source_positions=FRAMES // 2, max_target_positions=8,
                        pad_token_id=PAD, bos_token_id=START, eos_token_id=END, decoder_start_token_id=START,
                        suppress_tokens=None, begin_suppress_tokens=None, dropout=0.0)
    return WhisperForConditionalGeneration(cfg)


def greedy_transcripts(model: nn.Module, data: IdDataset, max_tokens: int = 4, batch_size: int = 128) -> list[list[int]]:
    """Each item's greedy transcript: decoder tokens after START up to (not including) END, at most ``max_tokens``
    (the seq2seq adapter's :meth:`~erasus_ray.tasks.seq2seq.Seq2SeqTask.greedy_decode`, which the registered
    ``<split>_wer`` metrics also use). Cost: up to ``max_tokens`` encoder + decoder passes per batch."""
    task = Seq2SeqTask(pad_token_id=PAD, decoder_start_token_id=START)
    was_training = model.training
    model.eval()
    try:
        return [t for batch in make_loader(data, task.collate, batch_size=batch_size)
                for t in task.greedy_decode(model, batch.data, max_tokens, {END})]
    finally:
        model.train(was_training)


def transcript_wer(model: nn.Module, data: IdDataset) -> float:
    """Word error rate of ``model``'s greedy transcripts of ``data`` against the reference words."""
    refs = [[int(t) for t in data[r][1]["labels"] if int(t) != END] for r in range(len(data))]
    return word_error_rate(refs, greedy_transcripts(model, data))


class AudioAsrBenchmark(AudioBenchmark):
    """Whisper transcribing the synthetic words; Adam 1e-3, 60 epochs, batch 32 (Adam 3e-3 for 30 epochs left the
    original wrong on 13-25% of its own training utterances on seeds 0 and 2; this recipe: 0% on seeds 0-2, ~11 s of
    one CPU thread per model)."""

    name = "audio_asr"
    task_class = Seq2SeqTask

    def dataset(self, waves: np.ndarray, words: np.ndarray) -> Dataset:
        return Transcribed(waves, words)

    def build_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return tiny_speech_whisper()

    def make_task(self) -> Task:
        return Seq2SeqTask(pad_token_id=PAD, decoder_start_token_id=START)

    def recipe(self, seed: int) -> TrainRecipe:
        return TrainRecipe(epochs=60, lr=1e-3, batch_size=32, optimizer="adam", seed=seed)

    def config(self, scenario: str, seed: int) -> dict[str, Any]:
        return {**super().config(scenario, seed), "model": "tiny_speech_whisper"}
