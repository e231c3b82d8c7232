"""Verification: has the forget set been forgotten, and is the model still useful?

Two layers, both measured with forward passes only:

* **Targets** (:data:`TARGETS`): what "forgotten" means for a run - ``class`` (a removed class is predicted no
  more often than other classes' samples are predicted as it), ``heldout`` (the forget set's per-sample losses look
  like a held-out set's: a loss-MIA AUC within a confidence band of 0.5 and a two-sample Kolmogorov-Smirnov test),
  ``gold`` (forget accuracy and SVC MIA efficacy within tolerance of a retrained model, :data:`VERIFY_RULE`, the rule
  the federated coordinator and the ledger use), ``gold_exact`` (the same on whole answers: the fraction of forget
  samples with every prediction unit right, :class:`GoldExactTarget`), ``generation`` (a class erased from a
  diffusion model: the judged rate of generating it at the gold model's level,
  :class:`erasus_ray.evaluation.diffusion.GenerationTarget`, which measures the model itself through
  :attr:`Target.measure_model`) or an explicit dict of metric bounds
  (:class:`BoundsTarget`; ``erased_generation_rate`` / ``retained_generation_acc`` bounds make a ``generation`` target).
  :func:`resolve_target` picks one for ``"auto"`` and says why. The closed-loop controller
  (:mod:`erasus_ray.control`) runs a strategy until its target holds on the **whole** forget set.
* **The utility guard** (:class:`Guard`): retain (and held-out) accuracy may not fall, nor retain loss rise, by
  more than a tolerance from the original model.

A :class:`Probe` measures a model on the whole forget set (streamed in batches), a fixed seeded sample of the retain
set and the held-out set; it never runs a backward pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping

import numpy as np
from scipy import stats
from torch import nn

from erasus_ray.data import IdDataset, make_loader
from erasus_ray.errors import ErasusError, InvalidConfigError, InvalidDataError
from erasus_ray.registry import Registry
from erasus_ray.evaluation.stats import SetStats, set_stats
from erasus_ray.tasks import Capability, Task, require

# --- the verification rule against a retrained model (federated, continual, ledger, target "gold") ---------------

VERIFY_RULE = (
    "per metric m in (forget_acc, mia_svc_efficacy) on the request's forget ids, gap(m) = |m(model) - m(federated "
    "retrain)|: passes if gap_after <= tolerance (max(floor, 95% Agresti-Coull half-width of a rate p = the retrain's "
    "value on n = forget ids)), or if the original was outside tolerance and unlearning closed at least {close:.0%} of its gap "
    "(gap_after <= (1 - {close}) gap_before); verified when every measurable metric passes"
)


def verification_checks(
    after: Mapping[str, float], before: Mapping[str, float] | None, n_forget: int, *, floor: float = 0.05, close_fraction: float = 0.9
) -> tuple[bool, dict[str, dict], str]:
    """Judge one request's unlearned model against the retrain model (``VERIFY_RULE``).

    ``after`` / ``before``: :func:`erasus_ray.evaluation.evaluate` of the unlearned and of the original model on the
    request's forget ids with the retrain model as gold (``gold_<m>``, ``gap_<m>``); ``before`` may be None (a
    resumed request whose original was not kept), and then only the tolerance counts. A model that did not change
    passes only where the original was already within tolerance of the retrain model - on a class that the original
    still predicts it fails. Returns ``(ok, checks, why)``: per metric the measured numbers and verdict, and a
    sentence naming the failing metrics.
    """
    checks: dict[str, dict] = {}
    failing = []
    for key in ("forget_acc", "mia_svc_efficacy"):
        gold, gap_after = after.get(f"gold_{key}"), after.get(f"gap_{key}")
        if gold is None or gap_after is None or not np.isfinite(gold) or not np.isfinite(gap_after):
            if key == "forget_acc":
                raise ErasusError("verification needs the forget accuracy of the model and of the retrain model")
            checks[key] = {"measurable": False}
            continue
        tol = verification_tolerance(gold, n_forget, floor)
        gap_before = None if before is None else before.get(f"gap_{key}")
        within = gap_after <= tol
        closed = gap_before is not None and gap_before > tol and gap_after <= (1.0 - close_fraction) * gap_before + 1e-12
        checks[key] = {
            "measurable": True, "gold": gold, "after": after[key], "before": None if before is None else before[key],
            "gap_after": gap_after, "gap_before": gap_before, "tolerance": tol, "within_tolerance": within,
            "closed_fraction": None if not gap_before else 1.0 - gap_after / gap_before, "passed": within or closed,
        }
        if not (within or closed):
            closed_by = "" if not gap_before else f", closed {max(0.0, 1 - gap_after / gap_before):.0%} of the original gap {gap_before:.3f} (needs {close_fraction:.0%})"
            failing.append(f"{key} gap {gap_after:.3f} > tolerance {tol:.3f}{closed_by}")
    return not failing, checks, "; ".join(failing)


def verification_tolerance(gold_value: float, n_forget: int, floor: float = 0.05) -> float:
    """How far a rate on the forget set (accuracy, MIA efficacy) may sit from the retrained model's and still count as
    equal: ``floor``, or the half-width of a 95% Agresti-Coull interval for a rate measured on ``n_forget`` samples when
    that is larger: ``1.96 sqrt(q (1 - q) / (n + 4))`` with ``q = (p n + 2) / (n + 4)``. Unlike the plain
    ``sqrt(p (1 - p) / n)`` it does not shrink to 0 when the retrained model gets every sample right (or wrong): on 30
    forgotten samples at p = 1 it is 0.079 (one sample is 0.033); at n = 150 it is under the 0.05 floor."""
    p = min(max(float(gold_value), 0.0), 1.0)
    n = max(int(n_forget), 1)
    q = (p * n + 2.0) / (n + 4.0)
    return max(float(floor), 1.96 * float(np.sqrt(q * (1 - q) / (n + 4.0))))


#: what :func:`verification_record` keeps of a run's verification (the rest - learning-rate history, per-verification
#: history, coreset ids - stays in the run's own result)
RECORD_KEYS = ("mode", "target", "why", "passed", "criteria", "violation", "overshoot", "guard", "guard_ok", "steps",
               "stopped", "final_fraction", "coreset_growth", "classes", "note", "rule", "failing", "parts", "why_failed", "power")


def verification_record(verification: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a run's verification (``UnlearningResult.verification``, the controller's or a one-off
    measurement's) that a ledger entry or a federated client's report carries: the mode (``closed_loop``,
    ``open_loop``, ``verified_once``, ``strength_search``, ``unverified``, ``no_effect``), the target and why it was
    chosen, each criterion's value and bounds, the guard, ``passed`` (True / False / None: nothing measurable), steps
    and the adaptive coreset's final fraction. JSON-able; cost: a dict copy."""
    return {k: verification[k] for k in RECORD_KEYS if k in verification}


def gold_rule_record(ok: bool, checks: Mapping[str, Mapping[str, Any]], why: str, *, close_fraction: float = 0.9) -> dict[str, Any]:
    """:func:`verification_checks`' verdict as a verification record of target ``gold`` (the shape of
    :func:`verification_record`: each metric's gap to the retrained model is a criterion bounded by its tolerance;
    a gap closed by ``close_fraction`` passes too, as :data:`VERIFY_RULE` says)."""
    criteria = [{"name": f"gap_{key}", "value": c["gap_after"], "low": None, "high": c["tolerance"], "passed": bool(c["passed"]),
                 **({"note": f"closed {c['closed_fraction']:.0%} of the original gap"} if c.get("closed_fraction") is not None else {})}
                for key, c in checks.items() if c.get("measurable")]
    return {"mode": "verified_once", "target": "gold", "why": "the model retrained without the forget ids",
            "rule": VERIFY_RULE.format(close=close_fraction), "passed": bool(ok), "criteria": criteria,
            **({"failing": why} if why else {})}


def failing_criteria(record: Mapping[str, Any]) -> str:
    """What made a failed verification record fail, in one line: the gold rule's ``failing`` sentence, else each failing
    criterion and guard check with its value and bounds (``mia_auc=0.71 outside [0.45, 0.55]``), else a no-effect run's
    ``why``, else how the run stopped."""
    if record.get("failing"):
        return str(record["failing"])
    checks = [(c, "") for c in record.get("criteria", [])] + [(c, "guard ") for c in record.get("guard", [])]
    out = "; ".join(f"{kind}{c['name']}={_fmt(c.get('value'))} outside [{c.get('low')}, {c.get('high')}]"
                    for c, kind in checks if not c.get("passed"))
    if not out and record.get("mode") == "no_effect":
        out = str(record.get("why", ""))
    return out or str(record.get("stopped") or "failed")


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) else str(value)


def combined_verification(server: Mapping[str, Any], parts: Mapping[str, list[Mapping[str, Any]]]) -> dict[str, Any]:
    """One request's verification from a main record (``server``: the federated server's or the continual unlearner's
    gold rule, :func:`gold_rule_record`; or a run's own :func:`verification_record`) and the records of the runs that
    served it (``parts``: e.g. per federated client, the controller's verification of each group of its ids): passed
    when no record failed and at least one measured something (a record with ``passed`` None measured nothing and
    does not count; all None -> None); ``why_failed`` names each failed record and its failing criteria."""
    failed = [f"{name}: {rec.get('target')} target failed ({rec.get('stopped', '')}): {failing_criteria(rec)}"
              for name, recs in sorted(parts.items()) for rec in recs if rec.get("passed") is False]
    if server.get("passed") is False:
        failed.insert(0, f"{server.get('target')} target: {failing_criteria(server)}")
    measured = server.get("passed") is not None or any(rec.get("passed") is not None for recs in parts.values() for rec in recs)
    passed = not failed if measured else None
    return {**dict(server), "passed": passed, "parts": {k: list(v) for k, v in parts.items()}, "why_failed": "; ".join(failed)}


# --- measurements ----------------------------------------------------------------------------------------------------


@dataclass
class Measurement:
    """A model measured on the whole forget set, the retain sample and the held-out set (None when not given)."""

    forget: SetStats
    retain: SetStats | None
    heldout: SetStats | None
    #: model-level measurements a target asked the probe for (e.g. judged generation rates), by name
    model_metrics: dict[str, float] = field(default_factory=dict)


class Probe:
    """Measures a model on the whole forget set, a fixed seeded sample of at most ``retain_samples`` retain ids and at
    most ``heldout_samples`` held-out ids. Cost: one forward pass per measured sample, no backward."""

    def __init__(self, task: Task, forget: IdDataset, retain: IdDataset | None, heldout: IdDataset | None, *,
                 retain_samples: int = 512, heldout_samples: int = 2048, seed: int = 0, batch_size: int = 256) -> None:
        self.task = task
        self.forget = forget
        self.retain = _sample(retain, retain_samples, seed)
        self.heldout = _sample(heldout, heldout_samples, seed + 1)
        self.batch_size = batch_size
        #: set by :func:`resolve_target` for a target that measures the model itself (:attr:`Target.measure_model`)
        self.model_metrics: Callable[[nn.Module], dict[str, float]] | None = None

    def measure(self, model: nn.Module) -> Measurement:
        run = lambda d: None if d is None else set_stats(model, self.task, d, self.batch_size)  # noqa: E731
        extra = {} if self.model_metrics is None else self.model_metrics(model)
        return Measurement(run(self.forget), run(self.retain), run(self.heldout), extra)


def _sample(data: IdDataset | None, n: int, seed: int) -> IdDataset | None:
    if data is None or len(data) == 0:
        return None
    if len(data) <= n:
        return data
    ids = np.sort(np.random.default_rng(seed).choice(data.ids, size=n, replace=False))
    return data.subset(ids)


# --- criteria, guard ---------------------------------------------------------------------------------------------------


@dataclass
class Criterion:
    """One measured check: ``low <= value <= high`` (either bound may be None)."""

    name: str
    value: float
    low: float | None = None
    high: float | None = None
    note: str = ""

    @property
    def passed(self) -> bool:
        if not math.isfinite(self.value):
            return False
        return (self.low is None or self.value >= self.low - 1e-12) and (self.high is None or self.value <= self.high + 1e-12)

    @property
    def violation(self) -> float:
        """How far outside its bounds the value is (0 when it passes)."""
        if not math.isfinite(self.value):
            return float("inf")
        return max(0.0, (self.low - self.value) if self.low is not None else 0.0, (self.value - self.high) if self.high is not None else 0.0)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "value": self.value, "low": self.low, "high": self.high, "passed": self.passed,
                **({"note": self.note} if self.note else {})}


@dataclass
class Verdict:
    """The target's criteria at one measurement; ``overshoot``: forgetting went past the target (e.g. forget losses
    far above the held-out ones), which the controller treats like a guard trip."""

    criteria: list[Criterion]
    overshoot: bool = False
    #: what the criteria can detect at this sample size (:meth:`Target.power`); None where not modelled
    power: dict[str, Any] | None = None

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.criteria)

    @property
    def violation(self) -> float:
        return sum(c.violation for c in self.criteria)

    def failing(self) -> list[str]:
        return [f"{c.name}={c.value:.4g} outside [{c.low}, {c.high}]" for c in self.criteria if not c.passed]

    def to_dict(self) -> dict[str, Any]:
        out = {"passed": self.passed, "violation": self.violation, "overshoot": self.overshoot, "criteria": [c.to_dict() for c in self.criteria]}
        return {**out, "power": self.power} if self.power is not None else out


@dataclass
class Guard:
    """Utility guard against the original model: retain accuracy may fall by at most ``max_acc_drop``, retain loss
    rise by at most ``max_loss_rise`` (nats), and held-out accuracy (on samples outside a removed class) fall by at
    most ``max_acc_drop``. Defaults: 0.02 and 0.5 (the loss bound matters for LMs, whose retain accuracy is a token
    rate; a classifier's retain loss near 0 may rise a little without a wrong prediction). On a small set the accuracy
    bound widens to the 95% interval half-width of an accuracy measured on that many samples
    (:func:`verification_tolerance`): on 72 held-out samples one sample is 1.4 points, and a 2-point bound would trip
    on two flipped samples the measurement cannot tell from noise (a federated client's local split)."""

    max_acc_drop: float = 0.02
    max_loss_rise: float = 0.5

    def __post_init__(self) -> None:
        for name in ("max_acc_drop", "max_loss_rise"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value >= 0 and math.isfinite(value)):
                raise InvalidConfigError(f"guard {name} must be a finite number >= 0, got {value!r}")

    def check(self, now: Measurement, original: Measurement, target: "Target") -> list[Criterion]:
        out = []
        # accuracy criteria only where the task has categorical predictions (a loss-only task is guarded by its loss)
        if now.retain is not None and original.retain is not None:
            if original.retain.has_acc:
                out.append(Criterion("retain_acc", now.retain.acc, low=original.retain.acc - self.acc_drop(original.retain)))
            out.append(Criterion("retain_loss", now.retain.mean_loss, high=original.retain.mean_loss + self.max_loss_rise))
        kept_now, kept_orig = target.guarded_heldout(now), target.guarded_heldout(original)
        if kept_now is not None and kept_orig is not None and len(kept_now) and kept_orig.has_acc:
            out.append(Criterion("heldout_acc", kept_now.acc, low=kept_orig.acc - self.acc_drop(kept_orig)))
        return out + target.guard_criteria(now, original, self)

    def acc_drop(self, original: SetStats) -> float:
        """The accuracy drop allowed on ``original``'s samples: ``max_acc_drop``, or the sampling half-width on a
        small set when larger."""
        return verification_tolerance(original.acc, len(original), floor=self.max_acc_drop)


# --- targets -----------------------------------------------------------------------------------------------------------

TARGETS: Registry["Target"] = Registry("target")


class Target:
    """What "forgotten" means: set-level criteria on a :class:`Measurement`, the forget ids that still fail
    per sample (the adaptive coreset adds them), and a reference loss level that progress is measured towards.

    Subclasses are built by :func:`resolve_target` with what ``fit`` received; ``requires`` names what must be given.
    """

    name: ClassVar[str] = "target"
    #: what the target needs: any of "heldout", "labels", "gold"
    requires: ClassVar[tuple[str, ...]] = ()
    #: what the task must provide to measure it (a loss-only task can be verified against held-out losses only)
    capabilities: ClassVar[frozenset[Capability]] = frozenset({Capability.LOSS})

    def prepare(self, original: Measurement, n_classes: int | None) -> None:
        """Record what the target needs from the original model (called once before unlearning)."""
        self.n_classes = n_classes

    def verdict(self, m: Measurement) -> Verdict:
        raise NotImplementedError

    def failing_ids(self, m: Measurement) -> np.ndarray:
        """Forget ids that still fail the per-sample criterion, most clearly failing first."""
        raise NotImplementedError

    def reference_loss(self, original: Measurement) -> float:
        """The per-sample loss a forgotten sample should reach (progress is measured towards it, in log space)."""
        return math.log(self.n_classes) if self.n_classes else max(1.0, 10 * original.forget.mean_loss)

    def guarded_heldout(self, m: Measurement) -> SetStats | None:
        """The held-out samples the utility guard watches (all of them; a class target drops the removed class)."""
        return m.heldout

    def guard_criteria(self, now: Measurement, original: Measurement, guard: Guard) -> list[Criterion]:
        """Utility checks of the target's own measurements that the guard adds (none by default)."""
        return []

    def power(self, n_forget: int, n_heldout: int) -> dict[str, Any] | None:
        """What the target's test can detect with ``n_forget`` forget and ``n_heldout`` held-out samples (a record
        with ``detectable``, ``min_n_forget`` and a ``statement``), or None where its power is not modelled. A service
        reads it before a run to decide whether a deletion this small can be verified at all."""
        return None

    #: a target that measures the model itself (beyond per-sample losses) sets this to a ``model -> {name: value}``
    #: callable; the probe calls it on every measurement and stores the values in ``Measurement.model_metrics``
    measure_model: Callable[[nn.Module], dict[str, float]] | None = None

    def describe(self) -> dict[str, Any]:
        return {"target": self.name}


@TARGETS.register("class")
class ClassTarget(Target):
    """A removed class (Golatkar et al. 2020; Chundawat et al. 2023's full-class setting): the forget samples are
    predicted as their class no more often than a model that never saw it would predict it - measured as the rate at
    which held-out (else retain-sample) samples of the other classes are predicted as a removed class: the forget
    accuracy may not exceed that rate's 95% binomial quantile on ``n_forget`` samples (0 when no other sample is
    predicted as the class: then every forget sample must be moved). Per sample, a forget sample fails while it is
    still predicted as its label (most confident first)."""

    requires = ("labels",)
    capabilities = frozenset({Capability.LOGITS, Capability.LABELS})

    def __init__(self, classes: np.ndarray) -> None:
        self.classes = np.asarray(classes)

    def _others(self, m: Measurement) -> SetStats | None:
        ref = m.heldout if m.heldout is not None else m.retain
        if ref is None or ref.label is None:
            return None
        return ref.where(~np.isin(ref.label, self.classes))

    def verdict(self, m: Measurement) -> Verdict:
        others = self._others(m)
        base = float(np.isin(others.pred, self.classes).mean()) if others is not None and len(others) else 0.0
        n = len(m.forget)
        bound = float(stats.binom.ppf(0.95, n, base)) / n
        where = "held-out" if m.heldout is not None else "retain-sample"
        return Verdict([Criterion("forget_acc", m.forget.acc, high=bound,
                                  note=f"{where} samples of other classes predicted as a removed class: {base:.4f}; bound: the "
                                       f"95% binomial quantile of that rate on {n} samples")])

    def failing_ids(self, m: Measurement) -> np.ndarray:
        f = m.forget
        still = f.correct > 0.5
        return f.ids[still][np.argsort(f.loss[still], kind="stable")]

    def guarded_heldout(self, m: Measurement) -> SetStats | None:
        if m.heldout is None or m.heldout.label is None:
            return m.heldout
        return m.heldout.where(~np.isin(m.heldout.label, self.classes))

    def describe(self) -> dict[str, Any]:
        return {"target": self.name, "classes": self.classes.tolist()}


#: the power a "detectable" AUC is quoted at (the usual 80%)
DETECTION_POWER = 0.8


def auc_detectable(n_members: int, n_nonmembers: int, alpha: float = 0.01, power: float = DETECTION_POWER) -> float:
    """The smallest membership AUC (above 0.5) that the two-sided AUC test at ``alpha`` detects with probability
    ``power``: ``0.5 + (z_{1-alpha/2} + z_power) * sd0`` with the Mann-Whitney null sd (an approximation: the sd under
    the alternative is a little smaller, so the quoted AUC is slightly conservative). At 5 forget vs 36 held-out
    samples it is ~0.94: a model that still separates its members with AUC 0.9 passes the test most of the time."""
    n1, n2 = max(int(n_members), 1), max(int(n_nonmembers), 1)
    z = float(stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power))
    return min(1.0, 0.5 + z * math.sqrt((n1 + n2 + 1) / (12.0 * n1 * n2)))


def auc_min_members(detectable: float, n_nonmembers: int, alpha: float = 0.01, power: float = DETECTION_POWER) -> int | None:
    """The fewest members at which :func:`auc_detectable` is at most ``detectable`` against ``n_nonmembers``
    non-members (None: no number of members reaches it with this few non-members). Closed form of
    ``(n1 + n2 + 1) / (12 n1 n2) <= (d / z)^2``."""
    z = float(stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power))
    c = 12.0 * ((detectable - 0.5) / z) ** 2
    n2 = max(int(n_nonmembers), 1)
    if detectable <= 0.5 or c * n2 <= 1.0:
        return None
    n1 = max(1, math.ceil((n2 + 1) / (c * n2 - 1.0)))
    while n1 > 1 and auc_detectable(n1 - 1, n2, alpha, power) <= detectable:  # guard the ceil against rounding
        n1 -= 1
    return n1


def auc_null_halfwidth(n_members: int, n_nonmembers: int, alpha: float = 0.01) -> float:
    """Half-width of the two-sided ``1 - alpha`` band around AUC 0.5 for two samples from one distribution: ``z``
    times the Mann-Whitney null standard deviation ``sqrt((n1 + n2 + 1) / (12 n1 n2))`` (default alpha 0.01, so a
    model that truly forgot fails this check about 1% of the time)."""
    n1, n2 = max(int(n_members), 1), max(int(n_nonmembers), 1)
    return float(stats.norm.ppf(1 - alpha / 2)) * math.sqrt((n1 + n2 + 1) / (12.0 * n1 * n2))


@TARGETS.register("heldout")
class HeldoutTarget(Target):
    """The forget set looks like data the model never saw (the membership-inference view of Shokri et al. 2017 and
    Yeom et al. 2018, as used for unlearning by MUSE's PrivLeak, Shi et al. 2024): the loss-threshold attack's AUC
    of forget (members) against held-out samples lies within a 99% band of 0.5 (two-sided: a forget set pushed far
    above the held-out losses is detectable too, and counts as overshoot), and a two-sample Kolmogorov-Smirnov test
    does not tell the two loss distributions apart at ``alpha`` (0.01). For an LM the per-sample loss is the
    answer-token loss, so the forget loss is brought to the held-out level, not beyond. Per sample, a forget sample
    fails while its loss is below the held-out losses' ``member_quantile`` (0.1) quantile (lowest loss first)."""

    requires = ("heldout",)

    def __init__(self, alpha: float = 0.01, member_quantile: float = 0.1) -> None:
        self.alpha = float(alpha)
        self.member_quantile = float(member_quantile)

    def verdict(self, m: Measurement) -> Verdict:
        f, h = m.forget.loss, m.heldout.loss
        auc = _auc(-f, -h)
        band = auc_null_halfwidth(len(f), len(h), self.alpha)
        ks = stats.ks_2samp(f, h)
        overshoot = auc < 0.5 - band
        return Verdict([
            Criterion("mia_loss_auc", auc, low=0.5 - band, high=0.5 + band, note=f"forget vs {len(h)} held-out losses"),
            Criterion("ks_pvalue", float(ks.pvalue), low=self.alpha, note=f"KS statistic {float(ks.statistic):.4f}"),
        ], overshoot=overshoot, power=self.power(len(f), len(h)))

    def power(self, n_forget: int, n_heldout: int, reference: float = 0.75) -> dict[str, Any]:
        """The loss-MIA AUC this test detects at this n (:func:`auc_detectable`, alpha = ``self.alpha``, power 0.8),
        and the fewest forget samples at which an AUC of ``reference`` (0.75) would be detected
        (:func:`auc_min_members`). Why: with 3-12 forget samples the band around 0.5 is so wide that the original
        model already passes - "indistinguishable" then says nothing."""
        detectable = auc_detectable(n_forget, n_heldout, self.alpha)
        min_n = auc_min_members(reference, n_heldout, self.alpha)
        return {"statistic": "mia_loss_auc", "n_forget": int(n_forget), "n_heldout": int(n_heldout), "alpha": self.alpha,
                "power": DETECTION_POWER, "detectable": detectable, "reference": reference, "min_n_forget": min_n,
                "statement": f"indistinguishable at n={n_forget} (vs {n_heldout} held-out): detectable AUC >= "
                             f"{detectable:.3f} at alpha {self.alpha:g} with power {DETECTION_POWER:g}; AUC {reference:g} "
                             f"needs n >= {min_n if min_n is not None else 'more held-out samples than given'}"}

    def failing_ids(self, m: Measurement) -> np.ndarray:
        threshold = float(np.quantile(m.heldout.loss, self.member_quantile))
        f = m.forget
        low = f.loss < threshold
        return f.ids[low][np.argsort(f.loss[low], kind="stable")]

    def reference_loss(self, original: Measurement) -> float:
        return float(np.median(original.heldout.loss))

    def describe(self) -> dict[str, Any]:
        return {"target": self.name, "alpha": self.alpha, "member_quantile": self.member_quantile}


def _auc(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> float:
    """AUC that a member scores higher than a non-member (ties count half), by ranks: O(n log n)."""
    n1, n2 = len(member_scores), len(nonmember_scores)
    if not n1 or not n2:
        return float("nan")
    ranks = stats.rankdata(np.r_[member_scores, nonmember_scores])
    return float((ranks[:n1].sum() - n1 * (n1 + 1) / 2) / (n1 * n2))


#: a gold model whose retain accuracy is below this fraction of the original's did not learn the data it was retrained
#: on (:func:`_check_gold_fits`)
GOLD_MIN_RETAIN_RATIO = 0.5


def _check_gold_fits(original: Measurement, gold: Measurement) -> None:
    """Refuse a gold model that does not fit the retain set it was retrained on: against it, "as forgotten as the
    retrained model" holds for any model that forgets everything. (``llava`` benchmark, seed 1: the retrain ended at
    retain answer accuracy 0.113, chance 0.10, against the original's 0.993, and the loop verified against it.)"""
    if original.retain is None or gold.retain is None or not (original.retain.has_acc and gold.retain.has_acc):
        return
    o, g = original.retain.acc, gold.retain.acc
    if math.isfinite(o) and math.isfinite(g) and o - g > 0.2 and g < GOLD_MIN_RETAIN_RATIO * o:
        raise InvalidConfigError(
            f"gold model does not fit the retain set: retain accuracy {g:.3f} against the original model's {o:.3f} "
            f"(below {GOLD_MIN_RETAIN_RATIO:g} x); a model retrained without the forget set fits the data it was "
            "trained on, so this one did not train (check its training run or seed), and every model that forgets "
            "everything would match it. Pass a retrained model that learned, or its metrics as a dict.")


@TARGETS.register("gold")
class GoldTarget(Target):
    """Close to a model retrained without the forget set (:data:`VERIFY_RULE`: forget accuracy and, with a held-out
    set, the SVC MIA efficacy of Jia et al. 2023 within tolerance of the retrained model's). ``gold`` is a model or
    a dict with ``forget_acc`` (and optionally ``mia_svc_efficacy``). Per sample, while the forget accuracy is above
    the gold model's, a forget sample fails while it is still predicted right."""

    requires = ("gold",)
    capabilities = frozenset({Capability.LOGITS})
    #: the forget-set rate compared with the retrained model's (:meth:`forget_rate`)
    forget_key: ClassVar[str] = "forget_acc"

    def __init__(self, gold: nn.Module | Mapping[str, float], probe: Probe | None = None, floor: float = 0.05) -> None:
        self.gold = gold
        self.floor = float(floor)
        self._probe = probe
        self.gold_metrics: dict[str, float] = {}
        self.gold_forget_loss: float | None = None

    def prepare(self, original: Measurement, n_classes: int | None) -> None:
        super().prepare(original, n_classes)
        if isinstance(self.gold, nn.Module):
            gm = self._probe.measure(self.gold)
            _check_gold_fits(original, gm)
            self.gold_metrics = self._rates(gm)
            self.gold_forget_loss = gm.forget.mean_loss
        else:
            key = self.forget_key
            if key not in self.gold:
                raise InvalidConfigError(f"target {self.name!r} with gold metrics needs {key!r}; got keys {sorted(self.gold)}")
            self.gold_metrics = {k: float(v) for k, v in self.gold.items() if k in (key, "mia_svc_efficacy")}

    def forget_rate(self, stats: SetStats) -> float:
        """The forget set's accuracy: the mean over samples of the fraction of their prediction units right."""
        return stats.acc

    def still_right(self, stats: SetStats) -> np.ndarray:
        """Per sample: is it still predicted right (more than half its units)?"""
        return stats.correct > 0.5

    def _rates(self, m: Measurement) -> dict[str, float]:
        """The forget rate and (with retain and held-out samples) the SVC MIA efficacy, as :func:`evaluate` computes it."""
        from erasus_ray.evaluation.classification import svc_mia_efficacy

        out = {self.forget_key: self.forget_rate(m.forget)}
        if m.retain is not None and m.heldout is not None:
            out["mia_svc_efficacy"] = svc_mia_efficacy(np.exp(-m.retain.loss), np.exp(-m.heldout.loss), np.exp(-m.forget.loss))
        return out

    def verdict(self, m: Measurement) -> Verdict:
        now = self._rates(m)
        out = []
        for key, gold in self.gold_metrics.items():
            if key not in now or not math.isfinite(gold):
                continue
            tol = verification_tolerance(gold, len(m.forget), self.floor)
            out.append(Criterion(key, now[key], low=gold - tol, high=gold + tol, note=f"retrained model: {gold:.4f}"))
        key = self.forget_key
        overshoot = key in now and now[key] < self.gold_metrics[key] - verification_tolerance(
            self.gold_metrics[key], len(m.forget), self.floor)
        return Verdict(out, overshoot=overshoot)

    def failing_ids(self, m: Measurement) -> np.ndarray:
        f = m.forget
        if self.forget_rate(f) <= self.gold_metrics[self.forget_key]:
            return np.zeros(0, np.int64)
        still = self.still_right(f)
        return f.ids[still][np.argsort(f.loss[still], kind="stable")]

    def reference_loss(self, original: Measurement) -> float:
        return self.gold_forget_loss if self.gold_forget_loss else super().reference_loss(original)

    def describe(self) -> dict[str, Any]:
        return {"target": self.name, "gold_metrics": self.gold_metrics}


@TARGETS.register("gold_exact")
class GoldExactTarget(GoldTarget):
    """As ``gold``, on the forget set's exact-answer rate (``forget_exact``: the fraction of samples with every
    prediction unit right, teacher-forced) instead of its mean unit accuracy; a sample counts as still known while all
    its units are right. For one unit per sample (a classifier) the two are the same. For a short answer of several
    tokens the unit accuracy also counts the tokens after the answer word, which a retrained model predicts after a
    word it never saw at a rate its initialisation sets: on the ``llava`` benchmark (answer "three </s>") three
    retrains of one split from init seeds 0/1/2 predict that ``</s>`` at 0.79/0.49/0.02 while none answers "three", so
    their forget accuracies (0.39/0.25/0.01) differ by more than any tolerance that still tells a forgotten answer
    from a known one; their exact rates are all 0.0."""

    forget_key = "forget_exact"

    def forget_rate(self, stats: SetStats) -> float:
        return float(self.still_right(stats).mean()) if len(stats) else float("nan")

    def still_right(self, stats: SetStats) -> np.ndarray:
        return stats.correct >= 1.0 - 1e-9


#: metrics a :class:`BoundsTarget` may bound, and what each needs
BOUND_METRICS = {
    "forget_acc": (), "forget_loss": (), "retain_acc": (), "retain_loss": (),
    "heldout_acc": ("heldout",), "heldout_loss": ("heldout",), "mia_loss_auc": ("heldout",),
}


@TARGETS.register("bounds")
class BoundsTarget(Target):
    """Explicit bounds on measured metrics: ``{"forget_acc": {"max": 0.1}, "forget_loss": {"min": 2.0}}`` (or
    ``(low, high)`` pairs). Metrics: see :data:`BOUND_METRICS`. Per sample, a forget sample fails while it is still
    predicted right (a ``forget_acc`` max) or its loss is below a ``forget_loss`` min."""

    def __init__(self, bounds: Mapping[str, Any]) -> None:
        if not isinstance(bounds, Mapping) or not bounds:
            raise InvalidConfigError("target bounds must be a non-empty dict of metric -> {'min': x, 'max': y}")
        self.bounds: dict[str, tuple[float | None, float | None]] = {}
        for key, spec in bounds.items():
            if key not in BOUND_METRICS:
                raise InvalidConfigError(f"unknown target metric {key!r}; known: {', '.join(sorted(BOUND_METRICS))}")
            low, high = (spec.get("min"), spec.get("max")) if isinstance(spec, Mapping) else tuple(spec)
            for v in (low, high):
                if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
                    raise InvalidConfigError(f"target bound for {key!r} must be finite numbers or None, got {spec!r}")
            if low is None and high is None:
                raise InvalidConfigError(f"target bound for {key!r} sets neither 'min' nor 'max'")
            self.bounds[key] = (low, high)
        self.requires = tuple(sorted({r for k in self.bounds for r in BOUND_METRICS[k]}))
        if any(k.endswith("_acc") for k in self.bounds):
            self.capabilities = frozenset({Capability.LOSS, Capability.LOGITS})

    def _values(self, m: Measurement) -> dict[str, float]:
        acc = lambda s: {} if not s.has_acc else {"acc": s.acc}  # noqa: E731  (a loss-only task has no accuracy)
        v = {"forget_loss": m.forget.mean_loss, **{f"forget_{k}": x for k, x in acc(m.forget).items()}}
        if m.retain is not None:
            v.update(retain_loss=m.retain.mean_loss, **{f"retain_{k}": x for k, x in acc(m.retain).items()})
        if m.heldout is not None:
            v.update(heldout_loss=m.heldout.mean_loss, mia_loss_auc=_auc(-m.forget.loss, -m.heldout.loss),
                     **{f"heldout_{k}": x for k, x in acc(m.heldout).items()})
        return v

    def verdict(self, m: Measurement) -> Verdict:
        values = self._values(m)
        missing = [k for k in self.bounds if k not in values]
        if missing:
            raise InvalidDataError(f"target metrics {missing} need retain data")
        return Verdict([Criterion(k, values[k], low=lo, high=hi) for k, (lo, hi) in self.bounds.items()])

    def failing_ids(self, m: Measurement) -> np.ndarray:
        f = m.forget
        fail = np.zeros(len(f), bool)
        if "forget_acc" in self.bounds and self.bounds["forget_acc"][1] is not None and f.acc > self.bounds["forget_acc"][1]:
            fail |= f.correct > 0.5
        if "forget_loss" in self.bounds and self.bounds["forget_loss"][0] is not None:
            fail |= f.loss < self.bounds["forget_loss"][0]
        return f.ids[fail][np.argsort(f.loss[fail], kind="stable")]

    def describe(self) -> dict[str, Any]:
        return {"target": self.name, "bounds": {k: {"min": lo, "max": hi} for k, (lo, hi) in self.bounds.items()}}


#: what ``target=`` accepts besides a dict of bounds
TARGET_NAMES = ("auto", "class", "heldout", "gold", "gold_exact", "generation")

#: metrics of the ``generation`` target that a dict of bounds may name (:mod:`erasus_ray.evaluation.diffusion`)
GENERATION_BOUNDS = ("erased_generation_rate", "retained_generation_acc")


def removed_classes(task: Task, forget: IdDataset, retain: IdDataset | None) -> np.ndarray | None:
    """The classes whose every training sample is in the forget set - the forget set's labels that no retain sample
    has - when *every* forget sample belongs to one; None otherwise (no labels, or a mixed forget set). Reads labels
    only (no model pass)."""
    f_labels = _labels(task, forget)
    if f_labels is None or retain is None or len(retain) == 0:
        return None
    r_labels = _labels(task, retain)
    if r_labels is None:
        return None
    return removed_classes_of(f_labels, r_labels)


def removed_classes_of(forget_labels: np.ndarray, retain_labels: np.ndarray) -> np.ndarray | None:
    """:func:`removed_classes` from labels already read (or only their distinct values, as a streamed job gathers
    them in its measuring pass): the forget labels that no retain label is, when every forget label is one of them."""
    f_labels, r_labels = np.unique(np.asarray(forget_labels)), np.unique(np.asarray(retain_labels))
    if not len(f_labels) or not len(r_labels):
        return None
    removed = np.setdiff1d(f_labels, r_labels)
    return removed if len(removed) and np.isin(f_labels, removed).all() else None


def _labels(task: Task, data: IdDataset) -> np.ndarray | None:
    parts = []
    for batch in make_loader(data, task.collate, batch_size=1024):
        label = task.labels_of(batch.data)
        if label is None:
            return None
        parts.append(np.asarray(label.cpu()))
    return np.concatenate(parts) if parts else None


@dataclass
class ResolvedTarget:
    """:func:`resolve_target`'s answer: the target (None: nothing measurable, the run is open-loop) and why."""

    target: Target | None
    why: str
    extra: dict[str, Any] = field(default_factory=dict)


def resolve_target(
    target: str | Mapping[str, Any] | Target, *, task: Task, forget: IdDataset, retain: IdDataset | None,
    heldout: IdDataset | None, gold: nn.Module | Mapping[str, float] | None, probe: Probe | None = None,
) -> ResolvedTarget:
    """Build the target for a run. ``"auto"``: a judged generative task (a diffusion task with a judge), a forget set
    of whole classes and a retrained model -> ``generation``; else a retrained model or gold metrics given -> ``gold``; every forget sample
    in a class that no retain sample has -> ``class``; a held-out set given -> ``heldout``; otherwise no measurable
    target (the run falls back to the strategy's fixed budget and says it is unverified). A named target that cannot
    be evaluated with what was given raises :class:`InvalidConfigError` naming what is missing."""
    resolved = _resolve(target, task=task, forget=forget, retain=retain, heldout=heldout, gold=gold, probe=probe)
    if resolved.target is not None:
        require(task, resolved.target.capabilities, algorithm=f"target {resolved.target.name!r}")
        if probe is not None:  # a target that measures the model itself: every measurement of the run includes it
            probe.model_metrics = resolved.target.measure_model
    return resolved


def _generation(task: Task, forget: IdDataset, retain: IdDataset | None, gold: Any, bounds: Mapping[str, Any] | None,
                why: str) -> ResolvedTarget:
    # the "generation" target registers itself from its own module (evaluation/diffusion.py, imported with the
    # evaluation package): looked up by name, so this layer does not import the diffusion one
    build = TARGETS.get("generation").from_request
    return ResolvedTarget(build(task, removed_classes(task, forget, retain), gold=gold, bounds=bounds), why)


def _judged(task: Task) -> bool:
    """Whether ``task`` generates class-conditionally and has a judge of what it generates (a diffusion task)."""
    return task.provides(Capability.GUIDANCE) and getattr(task, "judge", None) is not None


def _resolve(
    target: str | Mapping[str, Any] | Target, *, task: Task, forget: IdDataset, retain: IdDataset | None,
    heldout: IdDataset | None, gold: nn.Module | Mapping[str, float] | None, probe: Probe | None,
) -> ResolvedTarget:
    if isinstance(target, Target):
        return ResolvedTarget(target, "given")
    if isinstance(target, Mapping) and set(target) & set(GENERATION_BOUNDS):
        return _generation(task, forget, retain, gold, target, "explicit generation bounds")
    if target == "generation" or (target == "auto" and gold is not None and _judged(task)
                                  and removed_classes(task, forget, retain) is not None):
        return _generation(task, forget, retain, gold, None, "requested" if target == "generation" else
                           "a judged generative model, a forget set of whole classes and a model trained without them "
                           "were given")
    if isinstance(target, Mapping):
        t = BoundsTarget(target)
        _require(t, "bounds", heldout, gold)
        return ResolvedTarget(t, "explicit metric bounds")
    if not isinstance(target, str) or target not in TARGET_NAMES:
        raise InvalidConfigError(f"unknown target {target!r}; known: {', '.join(TARGET_NAMES)}, or a dict of metric bounds")
    # "auto" takes the gold rule only where it can be measured (it compares accuracies); otherwise it falls through
    if target in ("gold", "gold_exact") or (target == "auto" and gold is not None and task.provides(Capability.LOGITS)):
        if gold is None:
            raise InvalidConfigError(f"target {target!r} needs gold= (a model retrained without the forget set, or its metrics)")
        kind = GoldExactTarget if target == "gold_exact" else GoldTarget
        return ResolvedTarget(kind(gold, probe), "a retrained model was given" if target == "auto" else "requested")
    if target in ("class", "auto") and (target == "class" or task.provides(Capability.LOGITS)):
        classes = removed_classes(task, forget, retain)
        if classes is not None:
            return ResolvedTarget(ClassTarget(classes), f"every forget sample is in class(es) {classes.tolist()}, which no retain sample has")
        if target == "class":
            raise InvalidConfigError(
                f"target 'class' cannot be evaluated for task {task.name!r} on this data: it needs per-sample class "
                "labels, retain data, and a forget set made of whole classes (labels no retain sample has)")
    if target in ("heldout", "auto"):
        if heldout is not None:
            why = "requested" if target == "heldout" else "the forget set is not a whole class and a held-out set was given"
            return ResolvedTarget(HeldoutTarget(), why)
        if target == "heldout":
            raise InvalidConfigError("target 'heldout' needs heldout_data= (samples the model was never trained on)")
    return ResolvedTarget(None, "not verifiable: the forget set is not a whole class and neither heldout_data= nor gold= was "
                                "given, so nothing tells a forgotten sample from a remembered one; ran the strategy's fixed "
                                "default budget (pass heldout_data= for a closed loop)")


def _require(t: Target, name: str, heldout: Any, gold: Any) -> None:
    have = {"heldout": heldout is not None, "gold": gold is not None}
    missing = [r for r in t.requires if r in have and not have[r]]
    if missing:
        raise InvalidConfigError(f"target {name!r} needs {', '.join(m + '_data=' if m == 'heldout' else m + '=' for m in missing)}")
