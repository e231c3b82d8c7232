"""Contract tests shipped with the package: a family matrix of tiny trained models and the checks every strategy,
selector and task adapter must pass on it (as scikit-learn's ``check_estimator`` and ``optuna.testing``).

Example:
    >>> from erasus_ray.testing import build_family, check_selector, check_strategy, check_task
    >>> fam = build_family("mlp")                 # trained once per process, ~0.1 s
    >>> check_strategy("gradient_ascent", fam)    # runs a handful of steps, the forget loss must rise
    >>> check_selector("el2n", build_family("denoiser"))  # refuses with CapabilityError: no logits
    >>> check_task(fam.task, fam)                 # the adapter's contract on this family's data
"""

from erasus_ray.testing._family import FAMILIES, Family, build_family, family_names, register_family, trained_family
from erasus_ray.testing.checks import (
    STRATEGY_STEPS,
    check_metric,
    check_selector,
    check_strategy,
    check_task,
    declared_refusal,
    declared_requires,
    mean_loss,
)
from erasus_ray.testing import families  # noqa: F401  (registers the built-in families)

__all__ = [
    "FAMILIES",
    "Family",
    "STRATEGY_STEPS",
    "build_family",
    "check_metric",
    "check_selector",
    "check_strategy",
    "check_task",
    "declared_refusal",
    "declared_requires",
    "family_names",
    "mean_loss",
    "register_family",
    "trained_family",
]
