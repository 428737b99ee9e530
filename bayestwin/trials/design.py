"""Trial designs: two-arm parallel-group trials simulated from a population model."""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, field, replace

from bayestwin.errors import require_whole

ENDPOINTS = ("change", "responder", "exposure")
ANALYSES = ("ancova", "ttest")
METRICS = ("auc", "cmax", "ctrough")


@dataclass(frozen=True)
class TrialDesign:
    """A two-arm parallel-group trial.

    Parameters
    ----------
    control, treatment
        Therapy labels (progression family) or :class:`~bayestwin.dosing.Regimen` s (PK).
    n_per_arm
        Patients randomised to the control arm.
    allocation
        Treatment patients per control patient (2.0: 2:1 randomisation).
    visits
        Visit times; the last is the endpoint visit.
    randomisation
        The visit at which patients are randomised (default: the first); it is the baseline
        visit, and earlier visits are a run-in on the control therapy (the history a twin can
        be conditioned on, see :mod:`bayestwin.trials.procova`).
    endpoint
        ``"change"``: change from baseline at the last visit; ``"responder"``: a change beyond
        ``responder_threshold`` in the direction of benefit; ``"exposure"`` (PK): the log of
        ``metric`` (``"auc"`` over the visits by trapezoid, ``"cmax"`` or ``"ctrough"``, the
        level at the last visit) of each patient's concentration profile.
    direction
        ``"lower"`` if a lower outcome is better, ``"higher"`` otherwise.
    analysis
        Continuous endpoints: ``"ancova"`` (outcome on arm and baseline) or ``"ttest"`` (arm
        only; the PK exposure endpoint has no baseline and always uses it).
    dropout
        Probability of leaving before the last visit (exponential time to dropout, missing
        completely at random). ``missing``: ``"complete"`` analyses completers only; ``"locf"``
        carries the last visit observed forward (at least the baseline).
    alpha
        One-sided significance level of the frequentist test.
    delta, threshold
        Bayesian decision rule: success if P(benefit > ``delta``) > ``threshold`` (reference
        prior; see :mod:`bayestwin.trials.analysis`).
    decision
        Which rule defines a trial's success: ``"frequentist"`` or ``"bayesian"``.
    """

    control: object
    treatment: object
    n_per_arm: int
    allocation: float = 1.0
    visits: tuple = (0.0, 12.0)
    randomisation: float | None = None
    endpoint: str = "change"
    direction: str = "lower"
    analysis: str = "ancova"
    responder_threshold: float = 0.0
    metric: str = "auc"
    dropout: float = 0.0
    missing: str = "complete"
    alpha: float = 0.025
    delta: float = 0.0
    threshold: float = 0.975
    decision: str = "frequentist"
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {ENDPOINTS}, not {self.endpoint!r}")
        if self.analysis not in ANALYSES:
            raise ValueError(f"analysis must be one of {ANALYSES}, not {self.analysis!r}")
        if self.direction not in ("lower", "higher"):
            raise ValueError(f"direction must be 'lower' or 'higher', not {self.direction!r}")
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, not {self.metric!r}")
        if self.missing not in ("complete", "locf"):
            raise ValueError(f"missing must be 'complete' or 'locf', not {self.missing!r}")
        if self.decision not in ("frequentist", "bayesian"):
            raise ValueError(f"decision must be 'frequentist' or 'bayesian', not {self.decision!r}")
        require_whole("n_per_arm", self.n_per_arm, 2)  # 2.7 patients is refused, not read as 2
        if not self.allocation > 0:
            raise ValueError(f"allocation must be > 0, not {self.allocation}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), not {self.dropout}")
        if not 0 < self.alpha < 1 or not 0 < self.threshold < 1:
            raise ValueError("alpha and threshold must be in (0, 1)")
        visits = tuple(float(v) for v in self.visits)
        if len(visits) < 2 or any(b <= a for a, b in zip(visits, visits[1:], strict=False)):
            raise ValueError(f"visits must be at least two increasing times, not {self.visits!r}")
        object.__setattr__(self, "visits", visits)
        r = visits[0] if self.randomisation is None else float(self.randomisation)
        if r not in visits[:-1]:
            raise ValueError(f"randomisation ({r:g}) must be one of the visits before the last, {list(visits[:-1])}")
        object.__setattr__(self, "randomisation", r)
        object.__setattr__(self, "n_per_arm", int(self.n_per_arm))

    @property
    def baseline_index(self) -> int:
        """Index of the baseline (randomisation) visit in ``visits``."""
        return self.visits.index(self.randomisation)

    @property
    def n_treatment(self) -> int:
        """Patients on the treatment arm (``n_per_arm`` x ``allocation``)."""
        return int(round(self.n_per_arm * self.allocation))

    @property
    def n_total(self) -> int:
        """Patients on both arms."""
        return self.n_per_arm + self.n_treatment

    def with_n(self, n_per_arm: int) -> TrialDesign:
        """The same design with ``n_per_arm`` patients on the control arm."""
        return replace(self, n_per_arm=n_per_arm)

    def to_dict(self) -> dict:
        """The design as plain data (arms by their labels), for tables and trial files."""
        d = asdict(self)
        for arm in ("control", "treatment"):
            v = getattr(self, arm)
            d[arm] = v.label if hasattr(v, "label") else v
        return d


#: The keys a trial file may have, with their types (:mod:`bayestwin.tomlspec`).
TRIAL_SCHEMA = {
    "population": {
        "family": str,
        "data": str,
        "patients": int,
        "covariates": list,
        "therapies": list,
        "draws": int,
        "seed": int,
    },
    "design": {
        "control": (str, dict),
        "treatment": (str, dict),
        "n_per_arm": int,
        "allocation": float,
        "visits": list,
        "randomisation": float,
        "endpoint": str,
        "direction": str,
        "analysis": str,
        "responder_threshold": float,
        "metric": str,
        "dropout": float,
        "missing": str,
        "alpha": float,
        "delta": float,
        "threshold": float,
        "decision": str,
    },
    "simulation": {"trials": int, "seed": int, "assumed": dict, "sample_size": bool, "target": float},
}


def read_design(path=None, *, text: str | None = None) -> dict:
    """A trial file (TOML) as a dict with ``population``, ``design`` and ``simulation`` tables.

    See ``bayestwin trial --example`` and the README. Unknown keys (a typo such as ``patiens``
    or ``trails``) and wrong types are a :class:`~bayestwin.errors.SpecError` naming the table
    and the key; so is a missing ``[design]`` or a missing arm.
    """
    from bayestwin.errors import SpecError
    from bayestwin.tomlspec import check, read_toml, require

    if text is not None:
        spec, where = tomllib.loads(text), "the trial file"
    else:
        spec, where = read_toml(path), str(path)
    check(spec, TRIAL_SCHEMA, where)
    if "design" not in spec:
        raise SpecError(f"{where}: no [design] table")
    require(spec["design"], ("control", "treatment", "n_per_arm"), f"{where} [design]")
    return spec
