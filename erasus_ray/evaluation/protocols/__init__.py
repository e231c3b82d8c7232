"""Benchmark protocols: published evaluation definitions composed from the metric registry.

* :class:`UnlearningBenchmark` (:mod:`.benchmark`) runs a protocol against the gold model and gives a verdict
  (:mod:`.base`: PASS / PARTIAL / FAIL, thresholds); protocols are registered in :data:`PROTOCOLS`.
* :mod:`.general`: the classifier protocol (accuracies, membership attacks, Avg.Gap).
* :mod:`.tofu`: TOFU's truth ratio, model utility (registered metrics) and forget quality (KS test against the gold
  model); :mod:`.tofu_data`: paraphrased / perturbed answers for the fictitious-authors QA.
* :mod:`.muse`: MUSE's VerbMem, KnowMem and PrivLeak (Min-K%++ against the gold model) on the generated biography
  corpus of :mod:`.muse_data`.
* :mod:`.wmdp`: WMDP's four-choice scoring (answer letter log-likelihood), hazardous accuracy down to chance, general
  held; stand-in questions from :mod:`.wmdp_data`.
"""

from erasus_ray.evaluation.protocols import general as _general  # noqa: F401  (registers the protocol)
from erasus_ray.evaluation.protocols import tofu as _tofu  # noqa: F401  (registers the TOFU metrics and protocol)
from erasus_ray.evaluation.protocols import muse as _muse  # noqa: F401  (registers the MUSE metrics and protocol)
from erasus_ray.evaluation.protocols import wmdp as _wmdp  # noqa: F401  (registers the WMDP metrics and protocol)
from erasus_ray.evaluation.protocols.base import PROTOCOLS, BenchmarkReport, VerdictThresholds, verdict
from erasus_ray.evaluation.protocols.benchmark import UnlearningBenchmark

__all__ = ["PROTOCOLS", "BenchmarkReport", "UnlearningBenchmark", "VerdictThresholds", "verdict"]
