"""``audio``: a tiny Hugging Face ``Wav2Vec2ForSequenceClassification`` recognising which of 8 words was said, on
synthetic formant speech (:mod:`~erasus_ray.benchmarks.audio_data`: 6 speakers x 8 words x 12 utterances at 8 kHz,
0.4 s each, generated here with a fixed seed; synthetic speech, not recordings).

Scenarios: ``speaker`` forgets every training utterance of speaker ``forget_speaker`` (a person asking to be
removed; the gold model is retrained without their voice), ``random10`` a random 10% of the training utterances.
Train/test: 80/20, stratified by (speaker, word), made with the seed; the test set keeps the forgotten speaker's
held-out utterances. Sample ids are row indices. Input items are raw waveforms ``[SAMPLES]`` with the word as label,
through the classification adapter (which checks a ``{"array", "sampling_rate"}`` record against :data:`RATE`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import Dataset

from erasus_ray.benchmarks.audio_data import RATE, SPEAKERS, WORDS, spoken_words
from erasus_ray.benchmarks.base import BenchmarkSpec, TaskData
from erasus_ray.benchmarks.vision import ArrayDataset
from erasus_ray.data import IdDataset
from erasus_ray.errors import InvalidConfigError
from erasus_ray.tasks import ClassificationTask, Task
from erasus_ray.training import TrainRecipe


def tiny_speech_wav2vec2(num_labels: int = len(WORDS)) -> nn.Module:
    """An untrained ``Wav2Vec2ForSequenceClassification`` for 0.4 s at 8 kHz: three strided convolutions (x40
    downsampling: 80 frames of 5 ms), two transformer layers 32 wide, mean-pooled head."""
    from transformers import Wav2Vec2Config, Wav2Vec2ForSequenceClassification

    cfg = Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                         conv_dim=(32, 32, 32), conv_stride=(5, 4, 2), conv_kernel=(10, 8, 4), num_conv_pos_embeddings=8,
                         num_conv_pos_embedding_groups=4, num_labels=num_labels, classifier_proj_size=32,
                         mask_time_prob=0.0, layerdrop=0.0, hidden_dropout=0.0, attention_dropout=0.0,
                         activation_dropout=0.0, feat_proj_dropout=0.0, final_dropout=0.0)
    return Wav2Vec2ForSequenceClassification(cfg)


class AudioBenchmark(BenchmarkSpec):
    """Word recognition on synthetic formant speech; forget a speaker. Adam 1e-3, 40 epochs, batch 32."""

    name = "audio"
    scenarios = ("speaker", "random10")
    default_scenario = "speaker"
    task_class = ClassificationTask

    def __init__(self, forget_speaker: int = 2, repeats: int = 12, test_size: float = 0.2, **options: Any) -> None:
        super().__init__(forget_speaker=forget_speaker, repeats=repeats, test_size=test_size, **options)
        if not 0 <= int(forget_speaker) < len(SPEAKERS):
            raise InvalidConfigError(f"forget_speaker: must be a speaker index in [0, {len(SPEAKERS) - 1}], got {forget_speaker!r}")
        self.forget_speaker, self.repeats, self.test_size = int(forget_speaker), int(repeats), float(test_size)

    def build_data(self, scenario: str, seed: int) -> TaskData:
        # the speech itself does not depend on the split seed: every seed splits the same utterances
        waves, words, speakers = spoken_words(self.repeats, seed=0)
        base = self.dataset(waves, words)
        rows = np.arange(len(words))
        train_idx, test_idx = train_test_split(rows, test_size=self.test_size, random_state=seed,
                                               stratify=speakers * len(WORDS) + words)
        train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
        if scenario == "speaker":
            forget = train_idx[speakers[train_idx] == self.forget_speaker]
        else:
            rng = np.random.default_rng(seed)
            forget = np.sort(rng.choice(train_idx, size=int(round(0.1 * len(train_idx))), replace=False))
        info = {"forget_speaker": self.forget_speaker if scenario == "speaker" else None, "sampling_rate": RATE}
        return TaskData(IdDataset(base, train_idx, train_idx), IdDataset(base, test_idx, test_idx), forget, info)

    def dataset(self, waves: np.ndarray, words: np.ndarray) -> Dataset:
        """The items over the utterances: ``(waveform, word)`` (a transcribing variant makes Whisper items)."""
        return ArrayDataset(waves, words)

    def build_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return tiny_speech_wav2vec2()

    def make_task(self) -> Task:
        return ClassificationTask(sampling_rate=RATE)

    def recipe(self, seed: int) -> TrainRecipe:
        # lr 3e-3 (the matrix family's) reached 98% on seed 0 but stalled at 82-87% train accuracy on seeds 1 and 2
        return TrainRecipe(epochs=40, lr=1e-3, batch_size=32, optimizer="adam", seed=seed)

    def config(self, scenario: str, seed: int) -> dict[str, Any]:
        return {**super().config(scenario, seed), "model": "tiny_speech_wav2vec2", "data": "formant_speech_v1"}
