"""The audio benchmark: synthetic formant speech, the speaker-forgetting splits, word error rate, and (slow) the demo
strategy's effect against the retrained model."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from erasus_ray.benchmarks.audio_data import RATE, SAMPLES, SPEAKERS, WORDS, Speaker, spoken_words, utterance
from erasus_ray.errors import InvalidConfigError, InvalidDataError
from erasus_ray.evaluation.asr import word_edit_distance, word_error_rate


def test_word_error_rate_matches_a_hand_count():
    # "sat" -> "sit" is one substitution, the second "the" one deletion: 2 edits over 6 words
    assert word_edit_distance("the cat sat on the mat", "the cat sit on mat") == 2
    # two insertions over two reference words
    assert word_edit_distance("a b", "a x b c") == 2
    # corpus WER sums edits and words before dividing: (2 + 2) / (6 + 2), not the mean of 1/3 and 1
    assert word_error_rate(["the cat sat on the mat", "a b"], ["the cat sit on mat", "a x b c"]) == pytest.approx(0.5)
    assert word_error_rate([[3, 4]], [[3, 4]]) == 0.0  # token ids count as words
    assert word_error_rate(["a"], ["b c d"]) == 3.0  # a substitution and two insertions over one word


def test_word_error_rate_refuses_unpaired_or_empty_references():
    with pytest.raises(InvalidDataError, match="references and hypotheses"):
        word_error_rate(["a"], [])
    with pytest.raises(InvalidDataError, match="references"):
        word_error_rate([""], ["a"])


def test_formant_speech_is_seeded_and_speakers_differ_in_pitch():
    waves, words, speakers = spoken_words(repeats=1, seed=3)
    again, _, _ = spoken_words(repeats=1, seed=3)
    assert waves.shape == (len(SPEAKERS) * len(WORDS), SAMPLES) and waves.dtype == np.float32
    np.testing.assert_array_equal(waves, again)
    assert not np.array_equal(waves, spoken_words(repeats=1, seed=4)[0])
    assert np.bincount(words).tolist() == [len(SPEAKERS)] * len(WORDS)

    # a voiced vowel's spectrum peaks at its speaker's F0 harmonics: the autocorrelation lag of the strongest
    # periodicity (the pitch period) of the low and the high voice is near RATE / F0
    def period(speaker: Speaker) -> float:
        wave = utterance(WORDS.index("sa"), speaker, np.random.default_rng(0)).astype(np.float64)
        ac = np.correlate(wave, wave, "full")[len(wave) - 1:]
        lo, hi = int(RATE / 400), int(RATE / 60)
        return RATE / (lo + int(np.argmax(ac[lo:hi])))

    assert period(SPEAKERS[0]) == pytest.approx(SPEAKERS[0].f0, rel=0.15)
    assert period(SPEAKERS[-1]) == pytest.approx(SPEAKERS[-1].f0, rel=0.15)


def test_speaker_scenario_forgets_every_training_utterance_of_one_speaker():
    from erasus_ray.benchmarks.audio import AudioBenchmark

    spec = AudioBenchmark(forget_speaker=4)
    data = spec.build_data("speaker", seed=1)
    _, _, speakers = spoken_words(spec.repeats, seed=0)
    train = data.train.ids
    assert set(speakers[data.forget_ids]) == {4}
    np.testing.assert_array_equal(np.sort(data.forget_ids), np.sort(train[speakers[train] == 4]))
    assert 4 in set(speakers[data.test.ids])  # the forgotten voice's held-out utterances stay in the test set
    assert len(train) + len(data.test) == len(speakers) and not set(train) & set(data.test.ids)
    x, y = data.train[0][1]  # (id, (waveform, word))
    assert x.shape == (SAMPLES,) and 0 <= int(y) < len(WORDS)
    with pytest.raises(InvalidConfigError, match="forget_speaker"):
        AudioBenchmark(forget_speaker=len(SPEAKERS))


def test_audio_task_refuses_a_record_at_the_wrong_sampling_rate():
    from erasus_ray.benchmarks.audio import AudioBenchmark

    task = AudioBenchmark().make_task()
    wave = np.zeros(SAMPLES, np.float32)
    x, y = task.collate([({"array": wave, "sampling_rate": RATE}, 1)])
    assert x.shape == (1, SAMPLES) and y.tolist() == [1]
    with pytest.raises(InvalidDataError, match="16000 Hz.*8000 Hz"):
        task.collate([({"array": wave, "sampling_rate": 16000}, 1)])


def test_greedy_transcripts_stop_at_the_end_token_and_feed_the_word_error_rate():
    """A scripted decoder (its argmax at step t is a fixed token per row) through the audio_asr decoding loop: row 0
    says [word 0, END] -> transcript [3], right; row 1 says [3 + 1, 3 + 2, END] -> [4, 5] against reference [3]: one
    substitution and one insertion. WER = (0 + 2) / 2 reference words = 1.0."""
    from torch import nn

    from erasus_ray.benchmarks.audio_asr import END, FRAMES, FREQ_BINS, VOCAB, greedy_transcripts, transcript_wer
    from erasus_ray.data import IdDataset

    script = torch.tensor([[3, END, END, END], [4, 5, END, END]])

    class Scripted(nn.Module):
        def forward(self, input_features, decoder_input_ids):
            rows = input_features[:, 0, 0].long()  # each item's row of the script, written into its features
            step = decoder_input_ids.shape[1] - 1
            logits = torch.zeros(len(rows), decoder_input_ids.shape[1], VOCAB)
            logits[torch.arange(len(rows)), -1, script[rows, step]] = 1.0
            return SimpleNamespace(logits=logits)

    items = [{"input_features": torch.full((FREQ_BINS, FRAMES), float(r)), "labels": torch.tensor([3, END])}
             for r in range(2)]
    data = IdDataset(items, np.arange(2), np.arange(2))
    assert greedy_transcripts(Scripted(), data) == [[3], [4, 5]]
    assert transcript_wer(Scripted(), data) == pytest.approx(1.0)


def test_registered_wer_matches_a_hand_count_on_scripted_transcripts():
    """``<split>_wer`` through ``run_metrics`` and the seq2seq adapter's greedy decoding. Scripted transcripts: row 0
    says [3] for reference [3] (right); row 1 says [5, 7] for [4] (a substitution and an insertion); row 2 says [5] for
    the two-word [5, 6] (a deletion). forget = rows 0, 1: (0 + 2) / 2 words = 1.0; retain = row 2: 1 / 2 = 0.5;
    test = rows 0, 2: (0 + 1) / 3 = 1/3."""
    from torch import nn

    from erasus_ray.benchmarks.audio_asr import END, FRAMES, FREQ_BINS, PAD, START, VOCAB
    from erasus_ray.data import IdDataset
    from erasus_ray.evaluation import run_metrics
    from erasus_ray.tasks.seq2seq import Seq2SeqTask

    script = torch.tensor([[3, END, END, END], [5, 7, END, END], [5, END, END, END]])

    class Scripted(nn.Module):  # the row's scripted token at each decoder position, whatever the decoder input
        def forward(self, input_features, decoder_input_ids):
            rows = input_features[:, 0, 0].long()
            steps = torch.arange(decoder_input_ids.shape[1]).clamp_max(script.shape[1] - 1)
            return SimpleNamespace(logits=torch.nn.functional.one_hot(script[rows][:, steps], VOCAB).float())

    labels = [[3, END], [4, END], [5, 6, END]]
    items = [{"input_features": torch.full((FREQ_BINS, FRAMES), float(r)), "labels": torch.tensor(labels[r])}
             for r in range(3)]

    def split(rows: list[int]) -> IdDataset:
        return IdDataset(items, np.array(rows), np.array(rows))

    names = ["forget_wer", "retain_wer", "test_wer"]
    values = run_metrics(Scripted(), Seq2SeqTask(pad_token_id=PAD, decoder_start_token_id=START),
                         {"forget": split([0, 1]), "retain": split([2]), "test": split([0, 2])}, names,
                         eos_token_id=END)
    assert values == pytest.approx({"forget_wer": 1.0, "retain_wer": 0.5, "test_wer": 1 / 3})


def test_wer_is_in_the_seq2seq_suite_and_refused_by_adapters_that_cannot_transcribe():
    """A classifier cannot generate (CapabilityError); a causal LM generates but has no decoding from an encoder
    input (``greedy_decode``): neither gets WER in its default suite, and asking for it by name is refused."""
    from erasus_ray.evaluation import metric_names_for, run_metrics
    from erasus_ray.tasks import CapabilityError
    from erasus_ray.tasks.causal_lm import CausalLMTask
    from erasus_ray.tasks.classification import ClassificationTask
    from erasus_ray.tasks.seq2seq import Seq2SeqTask

    assert {"forget_wer", "retain_wer", "test_wer"} <= set(metric_names_for(Seq2SeqTask))
    assert not {n for n in metric_names_for(ClassificationTask) + metric_names_for(CausalLMTask) if n.endswith("_wer")}
    with pytest.raises(CapabilityError, match="generation"):
        run_metrics(torch.nn.Linear(2, 2), ClassificationTask(), {}, ["forget_wer"])
    with pytest.raises(InvalidConfigError, match="greedy_decode") as refused:
        run_metrics(torch.nn.Linear(2, 2), CausalLMTask(), {"forget": []}, ["forget_wer"])
    assert "tokenizer" not in str(refused.value)  # no hint at a tokenizer, which would not help


def test_whisper_reads_the_asr_features_and_its_loss_is_the_adapters():
    """The audio_asr items fit the tiny Whisper (input_features [FREQ_BINS, 2 x max_source_positions]) and the seq2seq
    adapter's mean per-sample loss equals the model's own loss on the same batch (one label length: equal means)."""
    from erasus_ray.benchmarks.audio_asr import AudioAsrBenchmark

    spec = AudioAsrBenchmark()
    data = spec.build_data("speaker", seed=0)
    model, task = spec.build_model(0), spec.make_task()
    batch = task.collate([data.train[r][1] for r in range(4)])
    own = model(input_features=batch["input_features"], labels=batch["labels"]).loss
    torch.testing.assert_close(task.per_sample_loss(model, batch).mean(), own, atol=1e-5, rtol=1e-5)


def test_demo_task_audio_runs_the_speaker_benchmark_against_the_retrained_model(monkeypatch):
    """--task audio: the audio benchmark with its demo defaults (grad_diff, el2n, target gold, the test split as
    held-out data); the defaults validate as a job."""
    import erasus_ray.cli.demo as demo
    from erasus_ray.cli import main
    from erasus_ray.experiment import DEMO_DEFAULTS, JobConfig

    seen = {}
    monkeypatch.setattr(demo, "run_demo", lambda **kw: seen.update(kw))
    assert main(["demo", "--task", "audio", "--no-progress", "--no-ray"]) == 0
    assert seen["benchmark"] == "audio" and seen["selector"] == "el2n"
    cfg = JobConfig.from_dict({"benchmark": "audio"})
    assert (cfg.strategy, cfg.target, DEMO_DEFAULTS["audio"]["heldout"]) == ("grad_diff", "gold", "test")


def test_audio_asr_demo_default_bounds_the_loss_mia_against_the_test_speakers():
    """audio_asr's demo default closes the loop on the loss MIA (at most 0.52) with the test split as held-out data:
    run_job hands that split to fit for a bounds target too (before, only gold targets got it), and no gold model."""
    from erasus_ray.experiment import JobConfig, run_job

    class Stop(Exception):
        pass

    seen = {}

    class Recording:  # stands in for ErasusUnlearner: records what run_job passes, stops before any work
        def __init__(self, *args, **kwargs):
            seen["target"] = kwargs["target"]

        def fit(self, **kwargs):
            seen.update(kwargs)
            raise Stop

    bench = SimpleNamespace(name="audio_asr", original=None, gold="gold model", task=None, model_factory=None,
                            recipe=None, forget="forget split", retain="retain split", test="test split")
    cfg = JobConfig.from_dict({"benchmark": "audio_asr"})
    assert cfg.strategy == "grad_diff"
    with pytest.raises(Stop):
        run_job(cfg, bench=bench, gold_metrics={}, progress=False, unlearner_cls=Recording)
    assert seen["target"] == {"mia_loss_auc": {"max": 0.52}}
    assert seen["heldout_data"] == "test split" and "gold" not in seen


@pytest.mark.slow
def test_demo_strategy_moves_the_forgotten_speaker_towards_the_retrained_model():
    """Seed 0, speaker 2 (original + gold cached under ERASUS_RAY_CACHE; training both takes ~65 s of CPU the first
    time). The demo default (closed-loop grad_diff, target gold with the test split as held-out data) on the full
    forget set. Measured (benchmarks/multimodal/audio/RESULTS.md): 24 steps, verified; forget loss 0.010 -> 0.052
    (gold 0.096), SVC MIA efficacy 0 -> 0.066 (gold 0.105), retain acc 100 -> 100, Avg.Gap 3.5 -> 1.8 pts; 24 s at
    load ~17. Bound: retain accuracy within 5 points of the original's."""
    from erasus_ray.benchmarks import load_benchmark
    from erasus_ray.evaluation import evaluate
    from erasus_ray.experiment import JobConfig, run_job

    bench = load_benchmark("audio", seed=0)
    gold = evaluate(bench.gold, forget=bench.forget, retain=bench.retain, test=bench.test, task=bench.task, seed=0)
    orig = evaluate(bench.original, forget=bench.forget, retain=bench.retain, test=bench.test, task=bench.task,
                    gold_metrics=gold, seed=0)
    job = run_job(JobConfig.from_dict({"benchmark": "audio", "seed": 0, "selector": None, "fraction": 1.0}),
                  bench=bench, gold_metrics=gold, progress=False, fraction=1.0)
    m = job["metrics"]
    assert job["verification"]["target"] == "gold" and job["report"]["steps"] > 0
    for key in ("forget_loss", "mia_svc_efficacy"):  # both move towards the retrained model's value
        assert abs(m[key] - gold[key]) < 0.7 * abs(orig[key] - gold[key]), (key, orig[key], m[key], gold[key])
    assert m["retain_acc"] >= orig["retain_acc"] - 0.05
    assert m["avg_gap"] < orig["avg_gap"]


def test_leaderboard_sections_replace_their_own_text_and_keep_the_others(tmp_path):
    """benchmarks/multimodal/audio/run.py writes each benchmark's table into one RESULTS.md: the audio classifier's
    as the file's head, audio_asr's between markers; rewriting one leaves the other as it was."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "multimodal" / "audio" / "run.py"
    spec = importlib.util.spec_from_file_location("audio_leaderboard_run", path)
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    results = tmp_path / "RESULTS.md"
    run.write_section(results, "audio", "# audio v1\n")
    run.write_section(results, "audio_asr", "## asr v1\n")
    run.write_section(results, "audio_asr", "## asr v2\n")
    run.write_section(results, "audio", "# audio v2\n")
    text = results.read_text()
    assert text.startswith("# audio v2\n") and text.count("asr v") == 1 and "## asr v2\n" in text
    assert "audio v1" not in text and text.count("<!-- section: audio_asr -->") == 1
