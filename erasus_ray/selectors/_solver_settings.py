"""The settings of each inverse-Hessian-vector-product solver of :class:`~erasus_ray.selectors.InfluenceSelector`.

One small dataclass per solver, holding only its own knobs (Kronfluence's ``arguments.py`` shape):
``InfluenceSelector(solver=CGSettings(max_iter=50, tol=1e-8))`` picks conjugate gradient with those knobs. The
selector's flat keywords (``ihvp="cg", cg_iters=50, cg_tol=1e-8``) stay as shorthand: each field names its flat
keyword in ``metadata["keyword"]`` (the field's own name where they agree), and :func:`solver_knobs` maps one form
onto the other through that table, so the two cannot drift apart.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Mapping, Union

from erasus_ray.checks import check_field_types, check_int, check_real
from erasus_ray.errors import InvalidConfigError
from erasus_ray.selectors._per_sample import FISHER_LABELS

FisherLabels = Literal[("auto", *FISHER_LABELS)]  # type: ignore[valid-type]


def _keyword(name: str) -> dict[str, str]:
    return {"keyword": name}


def _check_fisher_samples(value: Any) -> int | None:
    return check_int("fisher_samples", value, low=1, none_ok=True)


@dataclass
class DenseSettings:
    """A dense ``D x D`` curvature matrix and its Cholesky factor (``ihvp="exact"`` / ``"ggn"``).

    Attributes:
        curvature: ``"exact"`` (the closed-form head Hessian, else the autograd Hessian) or ``"ggn"`` (Gauss-Newton
            / Fisher from per-sample gradients).
        max_params: largest ``D`` formed densely (keyword ``max_exact_params``); memory ``8 D^2`` bytes.
        exact_solver: ``"auto"`` | ``"dense"`` | ``"woodbury"``: how a closed-form head Hessian is inverted.
        fisher, fisher_samples: the labels of the Gauss-Newton estimate (see the selector's doc).
    """

    method: ClassVar[str] = "dense"
    curvature: Literal["exact", "ggn"] = field(default="exact", metadata=_keyword("ihvp"))
    max_params: int = field(default=4096, metadata=_keyword("max_exact_params"))
    exact_solver: Literal["auto", "dense", "woodbury"] = "auto"
    fisher: FisherLabels = "auto"
    fisher_samples: int | None = None

    def __post_init__(self) -> None:
        check_field_types(self)
        self.max_params = check_int("max_params", self.max_params, low=1)
        self.fisher_samples = _check_fisher_samples(self.fisher_samples)

    @property
    def ihvp(self) -> str:
        return self.curvature


@dataclass
class CGSettings:
    """Conjugate gradient on exact Hessian-vector products (``ihvp="cg"``; Martens 2010). Cost: up to ``max_iter``
    HVPs over the Hessian sample per solve.

    Attributes:
        max_iter: most CG iterations (keyword ``cg_iters``).
        tol: stop once the residual is below ``tol`` relative to the right-hand side (keyword ``cg_tol``).
    """

    method: ClassVar[str] = "cg"
    max_iter: int = field(default=100, metadata=_keyword("cg_iters"))
    tol: float = field(default=1e-6, metadata=_keyword("cg_tol"))

    def __post_init__(self) -> None:
        check_field_types(self)
        self.max_iter = check_int("max_iter", self.max_iter, low=1)
        self.tol = check_real("tol", self.tol, low=0.0)

    ihvp = property(lambda self: self.method)


@dataclass
class LissaSettings:
    """LiSSA, a stochastic Neumann series (``ihvp="lissa"``; Agarwal, Bullins & Hazan 2017). Cost: ``depth x
    repeat`` minibatch HVPs per solve.

    Attributes:
        depth: series terms, or ``"auto"`` (``ln(100) scale / damping``, 100 to 20,000; keyword ``lissa_depth``).
        repeat: independent series averaged (keyword ``lissa_repeat``).
        scale: divides the Hessian so the series converges (None: a power-iteration estimate; ``lissa_scale``).
        batch_size: rows per minibatch HVP (None: the whole Hessian sample; ``lissa_batch_size``).
        tol: stop once each step is below ``tol`` relative to the row (keyword ``cg_tol``).
    """

    method: ClassVar[str] = "lissa"
    depth: int | Literal["auto"] = field(default="auto", metadata=_keyword("lissa_depth"))
    repeat: int = field(default=1, metadata=_keyword("lissa_repeat"))
    scale: float | None = field(default=None, metadata=_keyword("lissa_scale"))
    batch_size: int | None = field(default=64, metadata=_keyword("lissa_batch_size"))
    tol: float = field(default=1e-6, metadata=_keyword("cg_tol"))

    def __post_init__(self) -> None:
        check_field_types(self)
        if self.depth != "auto":
            self.depth = check_int("depth", self.depth, low=1)
        self.repeat = check_int("repeat", self.repeat, low=1)
        self.scale = check_real("scale", self.scale, low=0.0, low_open=True, none_ok=True)
        self.batch_size = check_int("batch_size", self.batch_size, low=1, none_ok=True)
        self.tol = check_real("tol", self.tol, low=0.0)

    ihvp = property(lambda self: self.method)


@dataclass
class KFACSettings:
    """Eigenvalue-corrected K-FAC for ``nn.Linear`` parameters (``ihvp="kfac"``; George et al. 2018).

    Attributes:
        correction: refit the eigenvalues in the Kronecker eigenbasis (EK-FAC; False: plain K-FAC;
            keyword ``kfac_correction``).
        cg_iters: for a set target, CG steps preconditioned by EK-FAC on exact HVPs (0: EK-FAC alone;
            keyword ``kfac_cg_iters``).
        tol: those CG steps' relative residual tolerance (keyword ``cg_tol``).
        fisher, fisher_samples: the labels of the Fisher factors.
    """

    method: ClassVar[str] = "kfac"
    correction: bool = field(default=True, metadata=_keyword("kfac_correction"))
    cg_iters: int = field(default=10, metadata=_keyword("kfac_cg_iters"))
    tol: float = field(default=1e-6, metadata=_keyword("cg_tol"))
    fisher: FisherLabels = "auto"
    fisher_samples: int | None = None

    def __post_init__(self) -> None:
        check_field_types(self)
        self.cg_iters = check_int("cg_iters", self.cg_iters, low=0)
        self.tol = check_real("tol", self.tol, low=0.0)
        self.fisher_samples = _check_fisher_samples(self.fisher_samples)

    ihvp = property(lambda self: self.method)


SolverSettings = Union[DenseSettings, CGSettings, LissaSettings, KFACSettings]
SOLVER_SETTINGS: tuple[type, ...] = (DenseSettings, CGSettings, LissaSettings, KFACSettings)


def keyword_map(cls: type) -> dict[str, str]:
    """field -> the selector's flat keyword for it, for one settings class (from the fields' metadata)."""
    return {f.name: f.metadata.get("keyword", f.name) for f in dataclasses.fields(cls)}


#: Every flat solver keyword of ``InfluenceSelector`` (but ``ihvp``, which picks the solver) and its default,
#: derived from the settings classes.
SOLVER_KEYWORDS: dict[str, Any] = {
    kw: f.default for cls in SOLVER_SETTINGS for f in dataclasses.fields(cls)
    for kw in [keyword_map(cls)[f.name]] if kw != "ihvp"
}


def _from_keywords(cls: type, knobs: Mapping[str, Any]) -> Any:
    """``cls`` built from the selector's flat keywords; an error names the keyword and the field."""
    names = {name: kw for name, kw in keyword_map(cls).items() if kw != "ihvp"}
    try:
        return cls(**{name: knobs[kw] for name, kw in names.items()})
    except InvalidConfigError as err:
        name = str(err).split(" ", 1)[0]
        raise InvalidConfigError(f"{names.get(name, name)}: {cls.__name__}.{err}") from None


def solver_knobs(solver: Any, ihvp: str, knobs: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """``(ihvp, flat keywords)`` for the selector, from its ``ihvp`` and flat solver keywords ``knobs`` and,
    optionally, one settings dataclass ``solver``, all checked by the dataclasses.

    With ``solver``, its fields set their keywords and its method sets ``ihvp`` (which must be ``"auto"`` or the
    same); a flat keyword of that solver given a non-default value as well is an error (neither silently wins).
    """
    out = dict(knobs)
    for cls in SOLVER_SETTINGS:  # every solver's knobs checked, whichever ``ihvp="auto"`` ends up picking
        _from_keywords(cls, knobs)
    if solver is None:
        return ihvp, out
    if not isinstance(solver, SOLVER_SETTINGS):
        names = [c.__name__ for c in SOLVER_SETTINGS]
        raise InvalidConfigError(f"solver must be one of {names} or None, got {type(solver).__name__}")
    if ihvp not in ("auto", solver.ihvp):
        raise InvalidConfigError(f"ihvp={ihvp!r} contradicts solver={type(solver).__name__} (ihvp {solver.ihvp!r}); give one")
    mapping = keyword_map(type(solver))
    twice = sorted(kw for kw in mapping.values() if kw in knobs and knobs[kw] != SOLVER_KEYWORDS[kw])
    if twice:
        raise InvalidConfigError(f"{twice} given both as keyword(s) and in solver={type(solver).__name__}; give each once")
    out.update({kw: getattr(solver, name) for name, kw in mapping.items() if kw != "ihvp"})
    return solver.ihvp, out
