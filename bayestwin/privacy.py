"""Differentially private populations, for virtual cohorts that can leave the hospital.

:func:`private_fit` releases the population parameters phi of a cohort under (epsilon,
delta)-differential privacy with respect to adding or removing one patient (all of that
patient's rows). The mechanism is **sample-and-aggregate** (Nissim, Raskhodnikova & Smith 2007,
"Smooth sensitivity and sampling in private data analysis", STOC; Smith 2011, "Privacy-preserving
statistical estimation with optimal convergence rates", STOC) with the **Gaussian mechanism**:

1. each patient goes to one of ``groups`` groups by a keyed hash of their pseudonym alone
   (:func:`partition`), so adding or removing a patient changes one group and no other;
2. each group is fitted on its own (:func:`bayestwin.fit`, the family's model on the public
   schema) and gives the posterior mean of phi in the sampler's unconstrained space (a group
   with fewer than ``min_patients`` patients gives the box's centre instead);
3. each estimate is clipped to a box fixed before seeing the data (:func:`clipping_box`): bounds
   the user gives from public knowledge, else the prior's mean ± ``clip_sds`` prior SDs per
   coordinate (the family's priors on the public schema) (:func:`aggregate`);
4. the clipped estimates are averaged; measured in box widths (each coordinate divided by its
   width), one patient moves the average by at most sqrt(d) / ``groups`` in L2 (one group from
   one corner of the box to the other): the sensitivity;
5. Gaussian noise of SD ``noise_multiplier x sensitivity`` box widths is added to every
   coordinate (:func:`gaussian_release`), the multiplier calibrated to (epsilon, delta) by
   Google's ``dp-accounting`` (its privacy-loss-distribution accountant, which is tight for the
   Gaussian mechanism: Balle & Wang 2018). Every coordinate is noised by the same fraction of
   its box; a narrow box is the cheapest utility there is.

Each group's NUTS run is random, but its randomness does not depend on the data; for every
value of it the release is the Gaussian mechanism on a function of sensitivity at most the one
above, so the guarantee holds for the mixture too. What comes out (the noised phi, the box, the
noise SD, the number of groups and (epsilon, delta)) is everything a
:class:`~bayestwin.population.Population` from :func:`private_fit` holds: no row, pseudonym,
count of patients or per-group result. Virtual cohorts drawn from it are post-processing and keep
the guarantee, provided their covariates are public too (``virtual_cohort`` refuses to resample
the cohort's covariates for it: it holds none).

**What is protected**: whether any one patient's rows were in the cohort (membership), and
therefore anything specific to that patient, to the degree (epsilon, delta) allows. **What is not**:
facts about the population itself (that is the release's purpose); the schema, priors and
covariate distributions, which must be public (given by the user, not derived from the rows:
:func:`private_fit` refuses a schema it is not given); patients' data that appear in several
rows of different patients (the unit is one patient); side channels (timing, floating-point
artefacts of sampling Gaussian noise: Mironov 2012); and the noise seed, which must stay secret
(the default draws it from the operating system; a ``noise_seed`` is for tests only).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from bayestwin.errors import require_whole

#: ``population.sampler["method"]`` of a population released by :func:`private_fit`.
METHOD = "dp-sample-and-aggregate"


@dataclass(frozen=True)
class DP:
    """A differential-privacy budget: (``epsilon``, ``delta``), for one release.

    ``epsilon`` > 0 bounds how much one patient's presence may change the probability of any
    output (by a factor e^epsilon); ``delta`` in (0, 1) is the probability mass allowed to
    escape that bound, and should be well below 1 / (number of patients).
    """

    epsilon: float
    delta: float

    def __post_init__(self):
        for name, value in (("epsilon", self.epsilon), ("delta", self.delta)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"DP {name} must be a finite number, not {value!r}")
        if not 0 < self.epsilon <= 100:
            raise ValueError(f"DP epsilon must lie in (0, 100], not {self.epsilon!r}")
        if not 0 < self.delta < 1:
            raise ValueError(f"DP delta must lie in (0, 1), not {self.delta!r}")

    @property
    def noise_multiplier(self) -> float:
        """The Gaussian noise SD per unit of L2 sensitivity that spends exactly this budget."""
        return noise_multiplier(float(self.epsilon), float(self.delta))


@lru_cache(maxsize=64)
def noise_multiplier(epsilon: float, delta: float) -> float:
    """Smallest Gaussian noise SD per unit L2 sensitivity that is (``epsilon``, ``delta``)-DP, by
    ``dp_accounting.calibrate_dp_mechanism`` with the privacy-loss-distribution accountant."""
    import dp_accounting
    from dp_accounting import pld

    return float(
        dp_accounting.calibrate_dp_mechanism(
            pld.PLDAccountant, dp_accounting.GaussianDpEvent, float(epsilon), float(delta)
        )
    )


@lru_cache(maxsize=64)
def spent(sigma_over_sensitivity: float, delta: float) -> float:
    """The epsilon a Gaussian mechanism of noise SD ``sigma_over_sensitivity`` x sensitivity
    spends at ``delta`` (the accountant's own figure, stored with a release)."""
    import dp_accounting
    from dp_accounting import pld

    acc = pld.PLDAccountant()
    acc.compose(dp_accounting.GaussianDpEvent(float(sigma_over_sensitivity)))
    return float(acc.get_epsilon(float(delta)))


# ------------------------------------------------------------------------- the mechanism
def partition(pseudonyms, groups: int, key: bytes) -> np.ndarray:
    """The group (0 .. ``groups`` - 1) of each pseudonym: HMAC-SHA256(``key``, pseudonym) mod
    ``groups``. A patient's group depends on their own pseudonym only."""
    require_whole("groups", groups, 1)
    out = np.empty(len(pseudonyms), dtype=np.int64)
    for i, p in enumerate(pseudonyms):
        digest = hmac.new(bytes(key), str(p).encode(), hashlib.sha256).digest()
        out[i] = int.from_bytes(digest[:8], "big") % groups
    return out


def aggregate(estimates, lower, upper) -> tuple[np.ndarray, float]:
    """The mean of the group ``estimates`` (m, d), each clipped to the box [``lower``, ``upper``],
    and its L2 sensitivity to one group's estimate **in box widths** (each coordinate divided by
    ``upper - lower``): sqrt(d) / m, one group moving from one corner of the box to the other."""
    est = np.asarray(estimates, float)
    lower, upper = np.asarray(lower, float), np.asarray(upper, float)
    if est.ndim != 2 or lower.ndim != 1 or est.shape[1] != lower.shape[0] or lower.shape != upper.shape:
        raise ValueError(f"estimates must be (groups, {lower.shape[0]}), not {est.shape}")
    if not (np.isfinite(lower).all() and np.isfinite(upper).all() and (upper > lower).all()):
        raise ValueError("the clipping box needs finite bounds with upper > lower in every coordinate")
    if np.isnan(est).any():
        raise ValueError("a group estimate is NaN: clipping cannot bound it")
    clipped = np.clip(est, lower, upper)
    return clipped.mean(axis=0), float(math.sqrt(len(lower)) / len(est))


def gaussian_release(
    mean, sensitivity: float, privacy: DP, rng: np.random.Generator, *, widths=None, size=None
) -> np.ndarray:
    """``mean`` plus Gaussian noise of SD ``privacy.noise_multiplier`` x ``sensitivity`` x
    ``widths`` (the box's widths; 1 if None) in each coordinate: the Gaussian mechanism on the
    mean measured in box widths, whose L2 sensitivity is ``sensitivity``. ``size`` releases at
    once are for tests of the mechanism."""
    mean = np.asarray(mean, float)
    widths = np.ones_like(mean) if widths is None else np.asarray(widths, float)
    sigma = privacy.noise_multiplier * float(sensitivity) * widths
    shape = mean.shape if size is None else (size, *mean.shape)
    return mean + sigma * rng.standard_normal(shape)


def membership_advantage_bound(privacy: DP) -> float:
    """The largest advantage (true-positive minus false-positive rate) any membership test can
    have against an (epsilon, delta)-DP release: (e^epsilon - 1 + 2 delta) / (e^epsilon + 1)
    (Kairouz, Oh & Viswanath 2015)."""
    e = math.exp(privacy.epsilon)
    return min(1.0, (e - 1 + 2 * privacy.delta) / (e + 1))


# ------------------------------------------------------------------------- the release
@dataclass(frozen=True)
class Box:
    """What the mechanism fixes before it sees a row: the family's twin program on the public
    schema (its population parameters phi, flattened in the sampler's unconstrained space) and
    the clipping box [``lower``, ``upper``] of phi."""

    program: object
    lower: np.ndarray
    upper: np.ndarray

    @property
    def widths(self) -> np.ndarray:
        return self.upper - self.lower

    @property
    def centre(self) -> np.ndarray:
        return (self.lower + self.upper) / 2


def clipping_box(family, schema, *, clip_sds: float = 2.0, bounds=None, seed: int = 0) -> Box:
    """The clipping box of ``family``'s population parameters on the public ``schema``: the
    prior's mean ± ``clip_sds`` prior SDs per coordinate (unconstrained space), replaced for each
    parameter named in ``bounds`` (``{"intercept": (40, 60), "sigma": (2, 10)}``, on the
    parameter's own scale, a pair per parameter or a pair of arrays of its shape) by those
    bounds. A weakly informative prior makes a wide box, and the noise grows with the box: bounds
    from public knowledge (published ranges, an earlier study) buy the most utility."""
    from bayestwin.engine import condition as cond
    from bayestwin.engine.compile import compile_twin
    from bayestwin.families import get_family
    from bayestwin.federated.site import prior_gaussian

    if not (
        isinstance(clip_sds, int | float)
        and not isinstance(clip_sds, bool)
        and math.isfinite(clip_sds)
        and clip_sds > 0
    ):
        raise ValueError(f"clip_sds must be a positive number, not {clip_sds!r}")
    program = compile_twin(get_family(family), schema, cond.padded_length(1))
    centre, cov = prior_gaussian(program.model, program.phi, seed=seed).moments()
    half = clip_sds * np.sqrt(np.diag(cov))
    lower, upper = centre - half, centre + half
    offsets, at = {}, 0
    for b in program.phi:
        offsets[b.rv] = (b, slice(at, at + b.size))
        at += b.size
    if bounds is not None and not isinstance(bounds, Mapping):
        raise TypeError(f"bounds must be a mapping {{parameter: (lower, upper)}}, not {type(bounds).__name__}")
    for name, pair in (bounds or {}).items():
        if name not in offsets:
            raise ValueError(f"bounds: unknown parameter {name!r}; the population's parameters are {sorted(offsets)}")
        block, where = offsets[name]
        if block.name == block.rv:
            forward = np.asarray
        elif block.name == f"{block.rv}_log__":
            forward = np.log
        else:
            raise ValueError(
                f"bounds: {name!r} is sampled as {block.name!r}; bounds can be given for parameters sampled on "
                "their own scale or on a log scale, and this one's box comes from its prior"
            )
        try:
            lo, hi = (np.broadcast_to(np.asarray(v, float), (block.size,)) for v in pair)
        except (TypeError, ValueError):
            raise ValueError(
                f"bounds[{name!r}] must be a pair (lower, upper) of numbers or arrays of shape {block.shape}, "
                f"not {pair!r}"
            ) from None
        if not (np.isfinite(lo).all() and np.isfinite(hi).all() and (hi > lo).all()):
            raise ValueError(f"bounds[{name!r}] needs finite lower < upper, not {pair!r}")
        if forward is np.log and (lo <= 0).any():
            raise ValueError(f"bounds[{name!r}]: {name} is positive, so its lower bound must be > 0, not {pair!r}")
        lower[where], upper[where] = forward(lo), forward(hi)
    return Box(program=program, lower=lower, upper=upper)


def group_estimates(
    cohort, family, box: Box, *, groups: int, min_patients: int, seed: int, draws, tune, chains, progressbar=False
):
    """The data holder's side, never released: each group's posterior mean of phi (unconstrained),
    shape (``groups``, d), the box's centre for a group of fewer than ``min_patients`` patients
    or whose posterior mean is not finite; and the number of group fits that failed the
    convergence gate (or gave a mean that is not finite)."""
    from bayestwin.data.cohort import PATIENT
    from bayestwin.engine.compile import unconstrained_draws
    from bayestwin.population import fit

    program = box.program
    key = hashlib.sha256(b"bayestwin-dp-partition" + int(seed).to_bytes(8, "big", signed=True)).digest()
    group = partition(cohort.patients, groups, key)
    row_group = cohort.frame[PATIENT].map(dict(zip(cohort.patients, group, strict=True))).to_numpy()
    estimates = np.tile(box.centre, (groups, 1))
    failed = 0
    for g in range(groups):
        if int((group == g).sum()) < min_patients:
            continue
        part = cohort.restrict(cohort.frame[row_group == g])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pop = fit(
                part,
                family,
                draws=draws,
                tune=tune,
                chains=chains,
                seed=seed + 1 + g,
                progressbar=progressbar,
                extend=0,
            )
        estimate = unconstrained_draws(program.model, pop.posterior, program.phi).mean(axis=0)
        if np.isfinite(estimate).all():  # else the box's centre: any value in the box keeps the bound
            estimates[g] = estimate
        failed += not (pop.verdict.converged and np.isfinite(estimate).all())
    return estimates, failed


def release(
    estimates, box: Box, privacy: DP, rng: np.random.Generator, *, family, schema, columns, seed: int = 0, extra=None
):
    """The released population: the group ``estimates`` clipped to ``box`` and averaged, plus
    the Gaussian mechanism's noise for ``privacy``. Its posterior holds whitened draws of
    N(released phi, diag(noise SD^2)) in the unconstrained space; ``sampler`` the budget and the
    mechanism's settings, nothing about the rows."""
    from bayestwin.federated.ep import Gaussian
    from bayestwin.federated.fit import _ep_datatree
    from bayestwin.population import Population
    from bayestwin.review.convergence import Verdict

    mean, sensitivity = aggregate(estimates, box.lower, box.upper)
    released = gaussian_release(mean, sensitivity, privacy, rng, widths=box.widths)
    sigma = privacy.noise_multiplier * sensitivity * box.widths
    program = box.program
    idata = _ep_datatree(program.model, program.phi, Gaussian(np.diag(1 / sigma**2), released / sigma**2), 2, 500, seed)
    idata["posterior"].attrs["method"] = "differentially private release: N(released phi, diag(noise SD^2)), whitened"
    sampler = {
        "method": METHOD,
        "epsilon": float(privacy.epsilon),
        "delta": float(privacy.delta),
        "epsilon_accountant": spent(privacy.noise_multiplier, privacy.delta),
        "accountant": f"dp_accounting {_version()} PLD accountant, Gaussian mechanism",
        "noise_multiplier": float(privacy.noise_multiplier),
        "sensitivity_in_box_widths": float(sensitivity),
        "groups": len(estimates),
        "parameters": coordinates(program.phi),
        "lower": box.lower.tolist(),
        "upper": box.upper.tolist(),
        "noise_sd": sigma.tolist(),
        "released_phi": released.tolist(),
        **(extra or {}),
    }
    verdict = Verdict(converged=True, table=_empty_table())
    return Population(family=family, schema=schema, columns=columns, idata=idata, verdict=verdict, sampler=sampler)


def private_fit(
    cohort,
    family="progression",
    *,
    schema,
    privacy: DP,
    groups: int = 20,
    bounds=None,
    clip_sds: float = 2.0,
    min_patients: int = 3,
    seed: int = 0,
    noise_seed: int | None = None,
    draws: int = 500,
    tune: int = 500,
    chains: int = 2,
    progressbar: bool = False,
):
    """A population released under differential privacy (sample-and-aggregate; see the module).

    Parameters
    ----------
    cohort
        The patients' rows, a :class:`~bayestwin.data.cohort.Cohort`.
    family
        A family instance or name; its priors on ``schema`` must not depend on the rows.
    schema
        The public :class:`~bayestwin.data.cohort.Schema` (therapies, covariate centring and
        levels, time and outcome scales), given by the user from public knowledge. The cohort's
        own schema is derived from its rows and would leak them.
    privacy
        The budget, :class:`DP` (epsilon, delta).
    groups
        Groups the patients are split into. More groups: less noise (it scales as 1/groups)
        but fewer patients per group fit. A few dozen patients per group is a good start.
    bounds
        Public bounds of some population parameters, on their own scale (see
        :func:`clipping_box`): the narrower the box, the less noise.
    clip_sds
        Half-width of the box, in prior SDs, of the parameters ``bounds`` does not name.
    min_patients
        Groups with fewer patients contribute the box's centre.
    seed
        Seeds the partition key, the prior's moments and each group's NUTS run (none of which
        depends on the data).
    noise_seed
        Seeds the noise. Keep None (fresh entropy from the operating system) for a real release:
        whoever knows the noise can remove it.
    draws, tune, chains
        Each group's NUTS run.

    Returns
    -------
    Population
        Its posterior holds draws of N(released phi, diag(noise SD^2)) in the unconstrained
        space (whitened: their mean is exactly the released phi), so ``virtual_cohort(...,
        uncertainty="mean")`` uses the release itself and ``"posterior"`` spreads replicates by
        the noise. ``population.sampler`` holds the budget, the accountant's epsilon, the noise
        SDs, the sensitivity, the box and the number of groups; nothing else about the rows.
    """
    from bayestwin.data.cohort import Cohort, Schema
    from bayestwin.families import get_family

    if not isinstance(privacy, DP):
        raise TypeError(f"privacy must be a bt.DP(epsilon, delta), not {type(privacy).__name__}")
    if not isinstance(schema, Schema):
        raise TypeError(
            "private_fit needs schema=, a bt.Schema from public knowledge (not the cohort's own, which is "
            f"derived from its rows), not {type(schema).__name__}"
        )
    if type(cohort) is not Cohort:
        raise TypeError(f"private_fit takes a bt.Cohort of the patients' rows, not {type(cohort).__name__}")
    require_whole("groups", groups, 2)
    require_whole("min_patients", min_patients, 1)
    fam = get_family(family)
    cohort = _on_public_schema(cohort, schema)
    box = clipping_box(fam, schema, clip_sds=clip_sds, bounds=bounds, seed=seed)
    estimates, failed = group_estimates(
        cohort,
        fam,
        box,
        groups=groups,
        min_patients=min_patients,
        seed=seed,
        draws=draws,
        tune=tune,
        chains=chains,
        progressbar=progressbar,
    )
    if failed:  # to the data holder only: the release says nothing of the groups
        warnings.warn(
            f"{failed} of {groups} group fits did not pass the convergence gate; their posterior means still "
            "enter the release, clipped (a mean that is not finite: the box's centre). A posterior mean needs "
            "less than the gate asks (an ESS of 200 gives a Monte-Carlo error of 0.07 posterior SD); more draws "
            "or larger groups help if R-hat is the cause.",
            stacklevel=2,
        )
    rng = np.random.default_rng(secrets.randbits(128) if noise_seed is None else noise_seed)
    extra = {
        "clip_sds": float(clip_sds),
        "bounds": {k: [np.asarray(v, float).tolist() for v in pair] for k, pair in dict(bounds or {}).items()},
        "min_patients": int(min_patients),
        "group_fit": {"draws": int(draws), "tune": int(tune), "chains": int(chains)},
    }
    return release(
        estimates, box, privacy, rng, family=fam, schema=schema, columns=cohort.columns, seed=seed, extra=extra
    )


def _on_public_schema(cohort, schema):
    """The cohort read with the public ``schema``, refused where the two disagree: a covariate
    of the cohort the schema lacks would be dropped silently, one the cohort lacks cannot be
    modelled, and a therapy or level outside the schema has no parameter."""
    from bayestwin.federated.site import on_schema

    mine = {**{c: "numeric" for c in cohort.schema.numeric}, **{c: "categorical" for c in cohort.schema.categorical}}
    public = {**{c: "numeric" for c in schema.numeric}, **{c: "categorical" for c in schema.categorical}}
    if mine != public:
        raise ValueError(
            f"the cohort's covariates {mine} differ from the public schema's {public}: every covariate of the "
            "cohort must be in the schema, as the same kind (a covariate the schema lacks would be dropped "
            "silently), and the schema can model only covariates the cohort has"
        )
    return on_schema(cohort, schema, "the cohort", subject="the cohort", against="the public schema")


def coordinates(blocks) -> list[str]:
    """A label per coordinate of the flat unconstrained phi: the value variable's name, with
    ``[i]`` for each element of a non-scalar one (``sigma_log__``, ``beta_level[1]``)."""
    return [b.name if b.shape == () else f"{b.name}[{i}]" for b in blocks for i in range(b.size)]


def _version() -> str:
    from importlib.metadata import version

    return version("dp-accounting")


def _empty_table():
    import pandas as pd

    return pd.DataFrame(columns=["r_hat", "ess_bulk", "ess_tail"])
