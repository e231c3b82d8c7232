"""Synthetic formant speech for the ``audio`` benchmarks: spoken "words" made here with a seed, not recordings.

No speech corpus ships in a package and no machine here reaches a download or has espeak, so the words are
*formant-synthesised* (the source-filter model of speech, Fant 1960; Klatt 1980 for the cascade of resonators):

- a **voiced segment** (vowel or nasal) is a glottal pulse train at the speaker's F0 (with 2% jitter per pulse and a
  slow F0 glide), smoothed by a one-pole glottal low-pass, through three second-order formant resonators (F1-F3);
- a **fricative** is white noise through a resonator at its place's frequency; a **stop** is a short silence then a
  noise burst; segments are joined with 8 ms raised-cosine ramps.

A word is a short sequence of such segments (:data:`WORDS`: ``"mi"``, ``"sa"``, ``"tu"``, ...). A **speaker** is an
F0, a speaking rate (segment durations scale with it) and a vocal-tract scale (every formant multiplies by it: a
shorter tract has higher formants), from :data:`SPEAKERS`. Each utterance adds its own F0 (+-6%) and duration (+-10%)
jitter, a random onset inside the window, a random gain and white noise at 15-30 dB SNR. Rate :data:`RATE` = 8 kHz
(telephone band: F3 of the highest voice stays under its 4 kHz Nyquist), :data:`SAMPLES` = 3200 (0.4 s) per utterance.

Cost: ~1 ms of scipy filtering per utterance (the default 576-utterance set: under a second).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.signal import lfilter

RATE, SAMPLES = 8000, 3200

#: vowel formants F1-F3 in Hz of an adult male tract (Peterson & Barney 1952, rounded)
VOWELS = {"a": (730, 1090, 2440), "e": (530, 1840, 2480), "i": (270, 2290, 3010), "o": (570, 840, 2410),
          "u": (300, 870, 2240)}
#: nasals: a low murmur formant, voiced, quieter
NASALS = {"m": (250, 1000, 2200), "n": (250, 1500, 2500)}
#: fricatives: noise centre frequency (Hz); stops: burst centre frequency (Hz) after ~40 ms of closure
FRICATIVES = {"s": 3300, "f": 1800}
STOPS = {"t": 3000, "k": 1600, "p": 700}
#: the vocabulary: a class is one of these words (each a sequence of segment letters)
WORDS = ("mi", "sa", "tu", "ko", "ne", "fi", "pa", "su")
#: base durations (s) at speaking rate 1
DURATION = {"vowel": 0.12, "nasal": 0.06, "fricative": 0.08, "stop": 0.05}


@dataclass(frozen=True)
class Speaker:
    """A synthetic voice: fundamental frequency (Hz), speaking rate (x durations^-1), vocal-tract formant scale."""

    f0: float
    rate: float
    tract: float


#: six voices from low adult-male-like to child-like: F0 95-250 Hz, rates 0.85-1.25, tract scales 0.92-1.25
SPEAKERS = (Speaker(95, 1.0, 0.92), Speaker(120, 1.2, 1.0), Speaker(150, 0.85, 1.05), Speaker(190, 1.1, 1.12),
            Speaker(220, 0.95, 1.18), Speaker(250, 1.25, 1.25))


def _resonator(x: np.ndarray, freq: float, bandwidth: float) -> np.ndarray:
    """A second-order digital resonator (Klatt 1980): unit gain at DC-normalised peak ``freq``, 3 dB ``bandwidth``."""
    r = np.exp(-np.pi * bandwidth / RATE)
    c1, c2 = 2 * r * np.cos(2 * np.pi * freq / RATE), -r * r
    return lfilter([1 - c1 - c2], [1, -c1, -c2], x)


def _voiced(n: int, f0: float, formants: tuple[float, ...], rng: np.random.Generator) -> np.ndarray:
    """``n`` samples of a pulse train at ``f0`` (gliding down 10%, jittered 2% per period) through the formants."""
    pulses = np.zeros(n)
    t = 0.0
    while t < n:
        pulses[int(t)] = 1.0
        glide = 1.0 - 0.1 * t / n
        t += RATE / (f0 * glide * (1 + 0.02 * rng.standard_normal()))
    source = lfilter([1.0], [1, -0.95], pulses)  # glottal low-pass: the -12 dB/octave slope of real voices
    out = source
    for freq, bw in zip(formants, (80, 110, 150)):
        out = _resonator(out, min(freq, 0.45 * RATE), bw)
    return _peak1(out)


def _noise(n: int, centre: float, rng: np.random.Generator) -> np.ndarray:
    return 0.3 * _peak1(_resonator(rng.standard_normal(n), min(centre, 0.45 * RATE), 600))


def _peak1(x: np.ndarray) -> np.ndarray:
    return x / (np.abs(x).max() + 1e-9)


def _segment(letter: str, speaker: Speaker, f0: float, stretch: float, rng: np.random.Generator) -> np.ndarray:
    scale = speaker.tract
    if letter in VOWELS:
        n = int(DURATION["vowel"] * stretch * RATE)
        return _voiced(n, f0, tuple(f * scale for f in VOWELS[letter]), rng)
    if letter in NASALS:
        n = int(DURATION["nasal"] * stretch * RATE)
        return 0.4 * _voiced(n, f0, tuple(f * scale for f in NASALS[letter]), rng)
    if letter in FRICATIVES:
        return _noise(int(DURATION["fricative"] * stretch * RATE), FRICATIVES[letter] * scale, rng)
    n = int(DURATION["stop"] * stretch * RATE)
    closure = np.zeros(int(0.6 * n))
    return np.concatenate([closure, 2 * _noise(n - len(closure), STOPS[letter] * scale, rng)])


def _join(segments: list[np.ndarray]) -> np.ndarray:
    """Concatenate with 8 ms raised-cosine ramps at each segment's edges (no clicks between segments)."""
    ramp = int(0.008 * RATE)
    window = 0.5 - 0.5 * np.cos(np.linspace(0, np.pi, ramp))
    out = []
    for seg in segments:
        seg = seg.copy()
        if len(seg) > 2 * ramp:
            seg[:ramp] *= window
            seg[-ramp:] *= window[::-1]
        out.append(seg)
    return np.concatenate(out)


def utterance(word: int, speaker: Speaker, rng: np.random.Generator) -> np.ndarray:
    """One ``[SAMPLES]`` float32 utterance of ``WORDS[word]`` by ``speaker``, with this utterance's own jitter,
    onset, gain and noise drawn from ``rng``."""
    f0 = speaker.f0 * (1 + 0.06 * rng.uniform(-1, 1))
    stretch = (1 + 0.1 * rng.uniform(-1, 1)) / speaker.rate
    wave = _join([_segment(letter, speaker, f0, stretch, rng) for letter in WORDS[word]])[:SAMPLES]
    wave = wave / (np.sqrt(np.mean(wave ** 2)) + 1e-9)
    out = np.zeros(SAMPLES)
    onset = rng.integers(0, SAMPLES - len(wave) + 1)
    out[onset:onset + len(wave)] = wave * rng.uniform(0.5, 1.0)
    snr_db = rng.uniform(15, 30)
    noise = rng.standard_normal(SAMPLES) * np.sqrt(np.mean(out ** 2) / 10 ** (snr_db / 10))
    return (out + noise).astype(np.float32)


def spoken_words(repeats: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(waves [n, SAMPLES] float32, words [n] int64, speakers [n] int64)`` with ``n = len(SPEAKERS) * len(WORDS) *
    repeats``: every speaker says every word ``repeats`` times. Deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    rows = [(w, s) for s in range(len(SPEAKERS)) for w in range(len(WORDS)) for _ in range(repeats)]
    waves = np.stack([utterance(w, SPEAKERS[s], rng) for w, s in rows])
    words, speakers = (np.array(col, dtype=np.int64) for col in zip(*rows))
    return waves, words, speakers
