"""Expectation propagation over sites: the maths of a federated population fit (pure functions).

Each site (hospital) k holds rows y_k that may not leave it. The population posterior factorises
over sites given the population parameters phi (patients, hence sites, are independent given
phi):

    p(phi | y_1..y_K) ∝ p(phi) ∏_k l_k(phi),   l_k(phi) = ∫ p(y_k, patients_k | phi) d patients_k.

Expectation propagation (Vehtari et al. 2020, "Expectation propagation as a way of life", JMLR
21(17), algorithm 1) approximates each l_k by a Gaussian factor g_k in the unconstrained space
of phi, so the global approximation g = p0 ∏_k g_k is Gaussian (p0: the prior, or a Gaussian fit
of it). One site step:

1. cavity g_-k = g / g_k (natural parameters subtract);
2. the site samples its *tilted* distribution g_-k(phi) l_k(phi) with its own rows (NUTS, on
   the site's machine) and returns the draws' mean and covariance;
3. the site's new factor is the tilted moments divided by the cavity (:func:`site_update`),
   damped: g_k <- g_k^(1-delta) g_new^delta.

What crosses the wire is a site factor: a d x d precision and a d-vector, never a row or a
patient's draw. Everything here works in natural parameters (precision Q, shift r = Q m), where
products and quotients of Gaussians are sums and differences.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

from bayestwin.errors import BayestwinError, require_whole


class SiteError(BayestwinError, ValueError):
    """A site's summary that cannot be used (malformed, out of range, or an improper cavity)."""


class Gaussian(NamedTuple):
    """A Gaussian factor in natural parameters: ``precision`` Q (d, d), ``shift`` r = Q m (d,).

    A site factor may be improper (Q not positive definite); a global approximation may not.
    """

    precision: np.ndarray
    shift: np.ndarray

    @classmethod
    def flat(cls, d: int) -> Gaussian:
        """The factor 1 (zero precision): a site's factor before its first update."""
        return cls(np.zeros((d, d)), np.zeros(d))

    def moments(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean, covariance); the precision must be positive definite."""
        cov = np.linalg.inv(self.precision)
        return cov @ self.shift, 0.5 * (cov + cov.T)

    def times(self, other: Gaussian) -> Gaussian:
        """The product of two Gaussian factors (natural parameters add)."""
        return Gaussian(self.precision + other.precision, self.shift + other.shift)

    def over(self, other: Gaussian) -> Gaussian:
        """The quotient of two Gaussian factors (natural parameters subtract), e.g. a cavity."""
        return Gaussian(self.precision - other.precision, self.shift - other.shift)


def check_factor(factor: Gaussian, d: int, site: str) -> Gaussian:
    """A site's factor as received: shapes (d, d) and (d,), finite, symmetric; else :class:`SiteError`."""
    try:
        q = np.asarray(factor.precision, float)
        r = np.asarray(factor.shift, float)
    except (AttributeError, TypeError, ValueError) as err:
        raise SiteError(f"site {site!r} sent a summary that is not a Gaussian factor ({err})") from None
    if q.shape != (d, d) or r.shape != (d,):
        raise SiteError(f"site {site!r} sent a factor of shapes {q.shape} and {r.shape}, not ({d}, {d}) and ({d},)")
    if not (np.isfinite(q).all() and np.isfinite(r).all()):
        raise SiteError(f"site {site!r} sent a factor with values that are not finite")
    if not np.allclose(q, q.T, rtol=1e-8, atol=1e-10 * max(1.0, float(np.abs(q).max()))):
        raise SiteError(f"site {site!r} sent a precision matrix that is not symmetric")
    return Gaussian(0.5 * (q + q.T), r)


def check_moments(mean, cov, draws, d: int, site: str) -> tuple[np.ndarray, np.ndarray, int]:
    """A site's tilted moments as received: a finite (d,) mean, a finite symmetric positive-
    definite (d, d) covariance, and a whole number of draws above d + 2; else :class:`SiteError`."""
    try:
        m = np.asarray(mean, float)
        c = np.asarray(cov, float)
    except (TypeError, ValueError) as err:
        raise SiteError(f"site {site!r} sent moments that are not arrays of numbers ({err})") from None
    if m.shape != (d,) or c.shape != (d, d):
        raise SiteError(f"site {site!r} sent moments of shapes {m.shape} and {c.shape}, not ({d},) and ({d}, {d})")
    if not (np.isfinite(m).all() and np.isfinite(c).all()):
        raise SiteError(f"site {site!r} sent moments with values that are not finite")
    if not np.allclose(c, c.T, rtol=1e-8, atol=1e-12 * max(1.0, float(np.abs(c).max()))):
        raise SiteError(f"site {site!r} sent a covariance matrix that is not symmetric")
    try:
        np.linalg.cholesky(0.5 * (c + c.T))
    except np.linalg.LinAlgError:
        raise SiteError(f"site {site!r} sent a covariance matrix that is not positive definite") from None
    if isinstance(draws, bool) or not isinstance(draws, (int, np.integer)) or draws <= d + 2:
        raise SiteError(
            f"site {site!r} sent draws={draws!r} (the effective draws behind its moments): a whole number above "
            f"{d + 2} is needed for {d} dimensions; run the sites' samplers longer"
        )
    return m, 0.5 * (c + c.T), int(draws)


def cavity(approx: Gaussian, site_factor: Gaussian, site: str) -> Gaussian:
    """g / g_k, which must be a proper Gaussian (positive-definite precision); else :class:`SiteError`."""
    out = approx.over(site_factor)
    try:
        np.linalg.cholesky(out.precision)
    except np.linalg.LinAlgError:
        raise SiteError(
            f"the cavity of site {site!r} is not a proper Gaussian (its precision is not positive definite): "
            "damp the updates more"
        ) from None
    return out


def tilted_precision(cov, draws: int | None) -> np.ndarray:
    """The precision of the tilted distribution from its covariance.

    From ``draws`` independent draws of a Gaussian the inverse of the sample covariance is biased
    upwards (its mean is that of an inverse Wishart, (n - 1) / (n - d - 2) times the precision);
    the factor (n - d - 2) / (n - 1) removes the bias. ``None``: exact moments.
    """
    q = np.linalg.inv(np.asarray(cov, float))
    q = 0.5 * (q + q.T)
    if draws is None:
        return q
    d = len(q)
    if draws <= d + 2:
        raise ValueError(f"{draws} draws cannot estimate a {d}-dimensional precision (need more than {d + 2})")
    return q * (draws - d - 2) / (draws - 1)


def _check_damping(damping) -> None:
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not 0.0 < damping <= 1.0:
        raise ValueError(f"damping must be in (0, 1], not {damping!r}")


def site_update(old: Gaussian, cav: Gaussian, mean, cov, *, draws: int | None = None, damping: float = 0.5) -> Gaussian:
    """The site's new factor: tilted moments (``mean``, ``cov``) over the cavity, damped.

    ``damping`` delta in (0, 1]: g_k <- (1 - delta) g_k + delta g_new in natural parameters
    (1: no damping). ``draws``: how many independent draws estimated the moments (their effective
    number), for the unbiased precision of :func:`tilted_precision`.
    """
    _check_damping(damping)
    q = tilted_precision(cov, draws)
    new = Gaussian(q - cav.precision, q @ np.asarray(mean, float) - cav.shift)
    return Gaussian(
        (1.0 - damping) * old.precision + damping * new.precision,
        (1.0 - damping) * old.shift + damping * new.shift,
    )


class EPResult(NamedTuple):
    approx: Gaussian  # the global approximation p0 ∏ g_k
    sites: tuple[Gaussian, ...]  # each site's factor
    history: list  # per iteration: the global mean and covariance


#: ``tilted(site_index, cavity) -> (mean, cov, draws)``: a site's tilted moments (draws None: exact).
Tilted = Callable[[int, Gaussian], tuple]


#: The smallest damping :func:`sweep` halves down to before it gives up on a sweep.
MIN_DAMPING = 1 / 64


def _proper(g: Gaussian) -> bool:
    try:
        np.linalg.cholesky(g.precision)
    except np.linalg.LinAlgError:
        return False
    return True


def marginal(g: Gaussian, idx) -> Gaussian:
    """The marginal of the proper Gaussian ``g`` over the coordinates ``idx``, in natural parameters."""
    idx = np.asarray(idx, int)
    mean, cov = g.moments()
    q = np.linalg.inv(cov[np.ix_(idx, idx)])
    q = 0.5 * (q + q.T)
    return Gaussian(q, q @ mean[idx])


def restrict(g: Gaussian, idx) -> Gaussian:
    """The natural parameters of a factor over ``idx`` alone (exact for a factor that is zero
    outside ``idx``, as a site factor of :func:`sweep` with ``subsets`` is)."""
    idx = np.asarray(idx, int)
    return Gaussian(g.precision[np.ix_(idx, idx)], g.shift[idx])


def embed(g: Gaussian, idx, d: int) -> Gaussian:
    """A factor over the coordinates ``idx`` as a factor over all ``d`` (zeros elsewhere)."""
    idx = np.asarray(idx, int)
    q, r = np.zeros((d, d)), np.zeros(d)
    q[np.ix_(idx, idx)] = g.precision
    r[idx] = g.shift
    return Gaussian(q, r)


def sweep(
    prior: Gaussian, sites: Sequence[Gaussian], tilted: Tilted, *, damping: float = 0.5, names=None, subsets=None
):
    """One parallel EP sweep: every site updates from the same global approximation, as sites
    running at the same time do. Returns ``(sites, approx, damping)``, new objects and the
    damping used: if the updates at ``damping`` would make the global approximation or a site's
    next cavity improper (noisy moments from small sites can), the same answers are applied
    again with half the damping, down to :data:`MIN_DAMPING` (damping moves EP's path, not its
    fixed points: Minka 2001; Vehtari et al. 2020, sec. 5.1). If a site fails (its ``tilted``
    raises, or it sends a malformed factor), or no damping helps, the exception propagates and
    the caller's state is untouched.

    ``subsets`` (one index array per site; ``None``: every site over all coordinates): the
    coordinates site k's factor depends on, the shared parameters and its *local* ones (e.g. the
    effects of the levels of a site factor that its rows hold; Vehtari et al. 2020, sec. 4.1 on
    local parameters). Site k is then given the cavity's marginal over its subset (``tilted``
    receives it), returns moments over it, and its factor is updated there and is zero
    elsewhere: coordinates its rows do not touch get no Monte-Carlo noise from it."""
    _check_damping(damping)
    d = len(prior.shift)
    names = [str(k) for k in range(len(sites))] if names is None else [str(n) for n in names]
    approx = product([prior, *sites])
    answers = []
    for k, old in enumerate(sites):
        cav = cavity(approx, old, names[k])
        if subsets is not None:
            cav = marginal(cav, subsets[k])
        answers.append((cav, *tilted(k, cav)))
    delta = float(damping)
    while True:
        updated = []
        for k, (old, (cav, mean, cov, draws)) in enumerate(zip(sites, answers, strict=True)):
            if subsets is None:
                factor = site_update(old, cav, mean, cov, draws=draws, damping=delta)
            else:
                idx = subsets[k]
                factor = embed(site_update(restrict(old, idx), cav, mean, cov, draws=draws, damping=delta), idx, d)
            updated.append(check_factor(factor, d, names[k]))
        new = product([prior, *updated])
        if _proper(new) and all(_proper(new.over(u)) for u in updated):
            return tuple(updated), new, delta
        if delta / 2 < MIN_DAMPING:
            raise SiteError(
                f"the sites' factors make an improper global approximation or cavity even damped to {delta:g}: "
                "the sites' moments are too noisy for their size (run their samplers longer)"
            )
        delta /= 2


def shift_in_sds(before: Gaussian, after: Gaussian) -> float:
    """How far the global approximation moved: the largest change of a mean in posterior SDs and
    of a log SD, over the coordinates (the stopping rule of :func:`expectation_propagation`)."""
    m0, c0 = before.moments()
    m1, c1 = after.moments()
    s0, s1 = np.sqrt(np.diag(c0)), np.sqrt(np.diag(c1))
    return float(max(np.max(np.abs(m1 - m0) / s1), np.max(np.abs(np.log(s1 / s0)))))


def expectation_propagation(
    prior: Gaussian,
    tilted: Tilted,
    n_sites: int,
    *,
    iterations: int = 6,
    damping: float = 0.5,
    tol: float = 0.0,
    subsets=None,
) -> EPResult:
    """Run EP over ``n_sites`` sites in parallel sweeps (:func:`sweep`), each site's tilted
    moments from ``tilted``, for ``iterations`` sweeps or until a sweep moves the global
    approximation by less than ``tol`` (:func:`shift_in_sds`). Returns the global approximation
    and the site factors. ``subsets``: each site's coordinates (:func:`sweep`).
    """
    require_whole("n_sites", n_sites, 1)  # no sites or no sweep would return the prior as if fitted
    require_whole("iterations", iterations, 1)
    _check_damping(damping)
    d = len(prior.shift)
    sites = tuple(Gaussian.flat(d) for _ in range(n_sites))
    approx = prior
    history = []
    for i in range(iterations):
        sites, new, _ = sweep(prior, sites, tilted, damping=damping, subsets=subsets)
        moved = shift_in_sds(approx, new) if i else np.inf
        approx = new
        history.append(approx.moments())
        if moved < tol:
            break
    return EPResult(approx, sites, history)


def product(factors: Sequence[Gaussian]) -> Gaussian:
    """The product of Gaussian factors (sum of natural parameters)."""
    out = factors[0]
    for g in factors[1:]:
        out = out.times(g)
    return out
