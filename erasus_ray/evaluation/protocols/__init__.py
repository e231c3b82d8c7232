"""Benchmark protocols: published evaluation definitions composed from the metric registry.

* :mod:`.tofu`: TOFU's truth ratio, model utility (registered metrics) and forget quality (KS test against the gold
  model); :mod:`.tofu_data`: paraphrased / perturbed answers for the fictitious-authors QA.
"""

from erasus_ray.evaluation.protocols import tofu as _tofu  # noqa: F401  (registers the TOFU metrics)
