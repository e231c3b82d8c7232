"""Offline benchmark tasks (``digits``, ``mnist5k``, ``authors``; tabular ``wine``, ``iris``, ``breast_cancer``;
``digits_diffusion``; vision-language ``clip`` and ``llava`` on captioned / questioned digits; ``video``, VideoMAE on
moving-digit clips; ``audio`` / ``audio_asr`` on synthetic formant speech) with cached original
and gold models.

``load_benchmark("digits", scenario="class", seed=0)`` returns a :class:`Benchmark`: forget/retain/test splits by
id, the task adapter, the training recipe, the original model and the gold model retrained on the retain set.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

from erasus_ray.benchmarks.base import Benchmark, BenchmarkSpec, TaskData, build_benchmark, cache_root
from erasus_ray.errors import UnknownNameError

# Imported lazily: ``authors`` pulls in transformers.
BENCHMARKS: dict[str, str] = {
    "digits": "erasus_ray.benchmarks.vision:DigitsBenchmark",
    "digits_diffusion": "erasus_ray.benchmarks.diffusion:DigitsDiffusionBenchmark",
    "clip": "erasus_ray.benchmarks.clip:ClipDigitsBenchmark",
    "llava": "erasus_ray.benchmarks.llava:LlavaDigitsBenchmark",
    "video": "erasus_ray.benchmarks.video:VideoDigitsBenchmark",
    "audio": "erasus_ray.benchmarks.audio:AudioBenchmark",
    "audio_asr": "erasus_ray.benchmarks.audio_asr:AudioAsrBenchmark",
    "digits_prompt_diffusion": "erasus_ray.benchmarks.diffusion:DigitsPromptDiffusionBenchmark",
    "mnist5k": "erasus_ray.benchmarks.vision:Mnist5kBenchmark",
    "authors": "erasus_ray.benchmarks.authors:AuthorsBenchmark",
    "wine": "erasus_ray.benchmarks.tabular:WineBenchmark",
    "iris": "erasus_ray.benchmarks.tabular:IrisBenchmark",
    "breast_cancer": "erasus_ray.benchmarks.tabular:BreastCancerBenchmark",
}


def benchmark_spec_class(name: str) -> type[BenchmarkSpec]:
    """The spec class of benchmark ``name`` (imports its module; builds nothing)."""
    if name not in BENCHMARKS:
        raise UnknownNameError(f"Unknown benchmark {name!r}. Known benchmarks: {', '.join(sorted(BENCHMARKS))}")
    module, cls = BENCHMARKS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def get_benchmark_spec(name: str, **options: Any) -> BenchmarkSpec:
    return benchmark_spec_class(name)(**options)


def load_benchmark(
    name: str, scenario: str | None = None, seed: int = 0, cache_dir: str | os.PathLike | None = None,
    gold: bool = True, **options: Any,
) -> Benchmark:
    """Build benchmark ``name`` (data, task, recipe) and its original and gold models (cached on disk);
    ``gold=False`` skips the gold model (``bench.gold is None``)."""
    return build_benchmark(get_benchmark_spec(name, **options), scenario=scenario, seed=seed, cache_dir=cache_dir,
                           gold=gold)


__all__ = ["BENCHMARKS", "Benchmark", "BenchmarkSpec", "TaskData", "benchmark_spec_class", "build_benchmark", "cache_root", "get_benchmark_spec", "load_benchmark"]
