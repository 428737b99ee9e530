"""Family ``ode``: population PK/PD models written as ordinary differential equations.

A model is an :class:`OdeModel`: named states, log-normal parameters, a right-hand side
``rhs(t, y, p) -> dy/dt`` written as a plain JAX function (``y`` the state vector, ``p`` a dict of
the subject's parameters), the observable outputs ``{name: f(y, p)}``, and optionally the
initial state ``init(p)`` (zeros otherwise; a turnover or myelosuppression model starts at its
baseline). Everything else is the PK family's: NONMEM event tables, covariate models on any
parameter, BSV per parameter and correlation blocks, the M3 method for BLQ levels, twins,
forecasts and virtual cohorts.

For each subject the ODE is solved by :func:`solve_doses` inside the JAX program (diffrax,
Tsit5 with an adaptive step, vmapped over subjects, chains and twins; gradients by
differentiating through the solver, diffrax's default). Doses split time into segments: a bolus
is a jump of its state at its time (an observation at that time sees it, as in NONMEM), an
infusion a constant input to its state over its duration, so the solver never steps across a
discontinuity.

Data: a dose's CMT names its state (CMT k is the k-th state; CMT 0 or absent:
``OdeModel.dose_state``); an observation's CMT names its output through ``observations``
(``{CMT: output}``; default: every level is the first output). Each output has its residual
error (``error=``, one kind for all or ``{output: kind}``): ``"additive"``, ``"proportional"``,
``"combined"`` or ``"exponential"`` (log y ~ N(log f, sigma), e.g. for neutrophil counts).
Resets (EVID 3, EVID 4) start a new episode from the model's initial state; steady-state doses
(SS=1, with ``steady_state=True``) start from the periodic state of their train
(:func:`steady_state`); SS=2 (superposition) is refused.

Built-in models (:data:`ODE_MODELS`): ``one_compartment`` (linear, the closed-form family's
model as an ODE, for checks), ``michaelis_menten`` (saturable elimination), ``effect_emax``
(effect compartment and sigmoid Emax), ``indirect_response`` (turnover, inhibition of
production), ``friberg`` (semi-mechanistic myelosuppression: Friberg et al., J Clin Oncol
2002; 20: 4713-21) and ``friberg_sequential`` (the same with its PK in closed form: a sequential
PK/PD model, :attr:`OdeModel.pk`).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pymc as pm
import pytensor.tensor as pt

from bayestwin.data.cohort import Schema
from bayestwin.data.nonmem import occasions
from bayestwin.families.base import Axis, Design, FamilyError, Prior, import_object, register_family
from bayestwin.families.pk import (
    ERRORS,
    Pk,
    _listed,
    log_ndtr,
    record_check,
    refuse_long_steady_infusions,
    refuse_occasions,
    refuse_time_varying,
)

ODE_ERRORS = (*ERRORS, "exponential")
#: Closed-form PK of sequential PK/PD models (:attr:`OdeModel.pk`): (compartments, route).
PK_FORMS = {"iv1": (1, "iv"), "oral1": (1, "oral"), "iv2": (2, "iv"), "oral2": (2, "oral")}


@dataclass(frozen=True)
class OdeModel:
    """A PK/PD model as an ODE (see the module docstring).

    Parameters
    ----------
    name
        A short name (shown in summaries).
    states
        State names, in the order of ``y`` (CMT k of a dose is the k-th state).
    parameters
        Log-normal parameter names (lower case), each with a typical value in ``centres``.
    rhs
        ``rhs(t, y, p) -> dy/dt`` in JAX (``p``: name -> the subject's value).
    outputs
        ``{name: f(y, p)}``: what an observation measures; the first is forecast.
    centres
        Each parameter's typical value, the centre of its default prior (log-normal, SD 1 on
        the log scale).
    init
        ``init(p) -> y0`` (default: all states zero).
    dose_state
        The state a dose with CMT 0 (or without CMT) goes into (default: the first).
    pk
        A sequential PK/PD model: the drug's concentration is a closed form of the PK family
        (:data:`PK_FORMS`: ``"iv1"``, ``"oral1"``, ``"iv2"``, ``"oral2"``; its parameters, e.g.
        ``cl`` and ``v``, among ``parameters``), given to ``rhs`` and the outputs as
        ``p["conc"]``; the states are the PD ones only and doses enter none. Fast PK then makes
        no stiff ODE (the Friberg model with docetaxel-like PK: see :func:`friberg`).
    """

    name: str
    states: tuple[str, ...]
    parameters: tuple[str, ...]
    rhs: Callable
    outputs: Mapping[str, Callable]
    centres: Mapping[str, float]
    init: Callable | None = None
    dose_state: str | None = None
    pk: str | None = None
    path: str | None = field(default=None, compare=False)  # "package.module:name" it was loaded from

    def __post_init__(self):
        if not self.states or not self.parameters or not self.outputs:
            raise FamilyError(f"OdeModel {self.name!r} needs states, parameters and outputs")
        missing = [p for p in self.parameters if p not in self.centres]
        if missing:
            raise FamilyError(f"OdeModel {self.name!r}: no typical value (centres) for {missing}")
        if any(p != p.lower() for p in self.parameters):
            raise FamilyError(f"OdeModel {self.name!r}: parameter names are lower case, not {self.parameters}")
        if self.dose_state is not None and self.dose_state not in self.states:
            raise FamilyError(f"OdeModel {self.name!r}: dose_state {self.dose_state!r} is not a state {self.states}")
        for p, c in self.centres.items():
            if not (np.isfinite(c) and c > 0):
                raise FamilyError(f"OdeModel {self.name!r}: the typical value of {p} must be positive, not {c!r}")
        if self.pk is not None:
            if self.pk not in PK_FORMS:
                raise FamilyError(f"OdeModel {self.name!r}: pk must be one of {sorted(PK_FORMS)}, not {self.pk!r}")
            need = [q for q in self._pk_family().parameters if q not in self.parameters]
            if need:
                raise FamilyError(f"OdeModel {self.name!r}: pk={self.pk!r} needs the parameters {need}")

    def _pk_family(self):
        compartments, route = PK_FORMS[self.pk]
        return Pk(compartments=compartments, route=route)

    def concentration(self, p: Mapping, t_dose, amt, duration, ii=None, episode=None) -> Callable:
        """The closed-form concentration ``(t, e) -> C(t)`` of a sequential model's PK, for one
        subject's doses (infusions where ``duration`` > 0; the others the route's own input;
        steady-state doses where ``ii`` > 0), in episode ``e`` (with ``episode``, each dose's:
        doses of other episodes count for nothing)."""
        fam = self._pk_family()
        theta = {q: p[q] for q in fam.parameters}
        code = (duration > 0).astype(float)
        dur = jnp.where(duration > 0, duration, 1.0)

        def conc(t, e=0.0):
            each = fam.concentration(jnp, theta, t, t_dose, amt, dur, code, ii=0.0 if ii is None else ii)
            return (each if episode is None else jnp.where(episode == e, each, 0.0)).sum()

        return conc

    @property
    def default_state(self) -> int:
        """Index of the state that receives doses (``dose_state``, else the first state)."""
        return self.states.index(self.dose_state) if self.dose_state else 0

    def initial(self, p: Mapping):
        """The states at time 0 for parameters ``p`` (zeros unless the model gives ``init``)."""
        return jnp.zeros(len(self.states)) if self.init is None else jnp.asarray(self.init(p), float)


# ------------------------------------------------------------------------------- the solver
def solve_doses(
    rhs,
    y0,
    p,
    t_dose,
    amt,
    state,
    duration,
    t_obs,
    *,
    rtol=1e-6,
    atol=1e-9,
    max_steps=512,
    solver=None,
    adjoint=None,
    conc=None,
    t_period=None,
    episode=None,
    obs_episode=None,
    y_reset=None,
    ss_ii=None,
):
    """The states at ``t_obs`` of y' = rhs(t, y, p) + inputs, y = ``y0`` before anything happens.

    Doses (arrays over dose slots): ``amt`` into state index ``state`` at ``t_dose``, a bolus when
    ``duration`` is 0, an infusion at rate amt/duration over [t_dose, t_dose + duration)
    otherwise; an empty slot has amt 0. Time is cut into segments at every dose time and
    infusion end, each solved with diffrax (Tsit5, PID step control at ``rtol``/``atol``); a
    bolus is added at the start of the first segment at its time, so an observation at a dose's
    own time sees it. ``conc``: a function of time (the closed-form concentration of a sequential
    PK/PD model), given to ``rhs`` as ``p["conc"]``; its doses then enter no state (pass
    ``amt`` 0) but still cut the segments. A segment that needs more than ``max_steps`` steps (stiff: e.g. absorption
    a thousand times faster than elimination, which warmup can wander into) makes every value
    NaN, so a sampler rejects the position instead of paying for it. ``t_period``: parameters
    that change over time (inter-occasion variability, time-varying covariates): each value of
    ``p`` is then an array over periods, period j holds from ``t_period[j]`` (sorted; the first
    -inf, padding +inf) until the next one, and ``y0`` is the state before anything happens
    (computed by the caller from period 0). Resets (NONMEM EVID 3/4 and SS=1): ``episode`` (per
    dose slot, sorted by episode as the family lays them out) and ``obs_episode`` (per time);
    the first dose of each later episode, and every dose with ``ss_ii`` > 0, resets the state to
    its row of ``y_reset`` (dose slots, n_states: the initial state, or a steady state's state just
    before its dose) before it is given; a dose acts only within its own episode (a running
    infusion stops at a reset, ADDL copies due after it are cancelled) and an observation reads
    its own episode's state (a level recorded at a reset's time but before it sees the state
    before it). ``conc`` is then called with the segment's episode. Returns (len(t_obs),
    n_states); pure JAX (jit, vmap and grad).
    """
    import diffrax

    n_state = y0.shape[0]
    infusion = duration > 0
    ends = jnp.where(infusion, t_dose + duration, t_dose)
    start = jnp.minimum(jnp.min(t_dose), jnp.min(t_obs))
    cuts = [start[None], t_dose, ends]
    if t_period is not None:  # parameter periods cut segments too (a padded +inf start cuts none)
        cuts.append(jnp.where(jnp.isfinite(t_period), jnp.maximum(t_period, start), start))
    bounds = jnp.sort(jnp.concatenate(cuts))
    lo_all = bounds
    hi_all = jnp.concatenate([bounds[1:], jnp.maximum(jnp.max(t_obs), bounds[-1])[None]])
    order = jnp.argsort(t_obs)
    ts = t_obs[order]
    onehot = jax.nn.one_hot(state, n_state)
    rate = jnp.where(infusion, amt / jnp.where(infusion, duration, 1.0), 0.0)
    first = jnp.searchsorted(bounds, t_dose, side="left")  # each bolus: the first segment at its time
    if conc is None:
        term = diffrax.ODETerm(lambda t, y, a: rhs(t, y, a[0]) + a[1])
    else:  # the closed-form concentration of the segment's episode
        term = diffrax.ODETerm(lambda t, y, a: rhs(t, y, {**a[0], "conc": conc(t, a[2])}) + a[1])
    solver, control = solver or diffrax.Tsit5(), diffrax.PIDController(rtol=rtol, atol=atol)
    last = bounds.shape[0] - 1
    resets = episode is not None or ss_ii is not None
    ep = jnp.zeros_like(t_dose) if episode is None else episode
    ep_obs = (jnp.zeros_like(t_obs) if obs_episode is None else obs_episode)[order]
    reset = ep > jnp.concatenate([jnp.zeros(1), ep[:-1]])  # the first dose slot of a later episode
    if ss_ii is not None:
        reset = reset | (ss_ii > 0)
    if resets and y_reset is None:
        y_reset = jnp.broadcast_to(y0, (t_dose.shape[0], n_state))

    def segment(carry, k):
        y, out, failed = carry
        lo, hi = lo_all[k], hi_all[k]
        if resets:
            hit = reset & (first == k)
            current = jnp.max(jnp.where(reset & (first <= k), ep, 0.0))  # the episode this segment is in
            latest = jnp.argmax(jnp.where(hit, ep, -1.0))  # two resets at one time: the later record's
            y = jnp.where(jnp.any(hit), y_reset[latest], y)
            mine = ep == current
        else:
            current, mine = 0.0, True
        y = y + jnp.where(~infusion & (first == k) & mine, amt, 0.0) @ onehot
        running = jnp.where(infusion & (t_dose <= lo) & (lo < ends) & mine, rate, 0.0) @ onehot
        if t_period is None:
            p_k = p
        else:  # the period this segment lies in: the last one started at or before it
            j = jnp.maximum(jnp.sum(t_period <= lo) - 1, 0)
            p_k = {n: v[j] for n, v in p.items()}
        sol = diffrax.diffeqsolve(
            term,
            solver,
            lo,
            hi,
            None,
            y,
            args=(p_k, running, current),
            saveat=diffrax.SaveAt(ts=jnp.clip(ts, lo, hi), t1=True),
            stepsize_controller=control,
            max_steps=max_steps,
            throw=False,
            **({} if adjoint is None else {"adjoint": adjoint}),
        )
        # a time on the boundary of two segments is read from the later one (it sees a dose given
        # then), unless that one belongs to a later episode than the observation
        inside = (ts >= lo) & ((ts <= hi) | (k == last)) & (ep_obs == current)
        ok = sol.result == diffrax.RESULTS.successful
        return (sol.ys[-1], jnp.where(inside[:, None], sol.ys[:-1], out), failed | ~ok), None

    out0 = jnp.broadcast_to(y0, (ts.shape[0], n_state))
    (_, out, failed), _ = jax.lax.scan(segment, (y0, out0, jnp.array(False)), jnp.arange(bounds.shape[0]))
    # a segment that needed more than max_steps (a stiff corner of parameter space, far from any
    # posterior) gives NaN: the sampler rejects that position rather than pay thousands of steps
    return jnp.where(failed, jnp.nan, out[jnp.argsort(order)])


@partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def _periodic_state(step, y0, args, tol, active):
    return _newton(step, y0, args, tol, active)


def _newton(step, y0, args, tol, active, iterations: int = 30):
    """The fixed point of ``y -> step(y, args)`` by Newton's method from ``y0``; converged when
    the residual is below ``tol`` of the state's largest amount, NaN if not within
    ``iterations`` (the sampler then rejects the position). Where ``active`` is false (a dose
    slot that is not a steady-state dose, under ``vmap``), ``y0`` untouched: no solve, and no
    NaN from a model whose initial state is not at rest."""

    n = y0.shape[0]

    def go(c):
        y, i, _ = c
        m = step(y, args)
        r = m - y
        done = jnp.max(jnp.abs(r)) <= tol * jnp.max(jnp.abs(y))
        # the Jacobian by forward differences, each state moved by 1e-4 of its own size (of the
        # largest amount, for a state near 0); only the fixed point has to be exact, not the path
        h = 1e-4 * jnp.maximum(jnp.abs(y), 1e-3 * jnp.maximum(jnp.max(jnp.abs(y)), jnp.max(jnp.abs(m))) + 1e-300)
        moved = jax.vmap(lambda z: step(z, args))(y[None] + jnp.diag(h))
        jac = (moved - m).T / h[None, :] - jnp.eye(n)
        return jnp.where(done, y, y - jnp.linalg.solve(jac, r)), i + 1, done

    start = (y0, 0, ~jnp.asarray(active, bool))
    y, _, done = jax.lax.while_loop(lambda c: (c[1] < iterations) & ~c[2], go, start)
    return jnp.where(done, y, jnp.nan)


def _periodic_fwd(step, y0, args, tol, active):
    y = _newton(step, y0, args, tol, active)
    return y, (y, args, active)


def _periodic_bwd(step, tol, res, ct):
    """Implicit function theorem: y = step(y, a) gives dy/da = (I - dstep/dy)^-1 dstep/da; one
    linearisation of ``step`` gives both the transposed Jacobian and the cotangent of ``a``
    (nothing where the slot is not ``active``)."""
    y, args, active = res
    pullback = jax.vjp(step, y, args)[1]
    eye = jnp.eye(y.shape[0])
    jac = jax.vmap(lambda e: pullback(e)[0])(eye)  # row j: e_j^T dstep/dy
    w = jnp.where(active, jnp.linalg.solve((eye - jac).T, ct), 0.0)
    return jnp.zeros_like(y), pullback(w)[1], jnp.zeros_like(active)


_periodic_state.defvjp(_periodic_fwd, _periodic_bwd)


def steady_state(model: OdeModel, p: Mapping, amt, state, duration, ii, active=True, **tol):
    """The state just before a steady-state dose (NONMEM SS=1): the periodic state of the
    infinite train of the dose (``amt`` into ``state``, a bolus, or an infusion over
    ``duration`` < ``ii``) given every ``ii``, i.e. the fixed point y = M(y) of the map M from
    one dose to the next (state plus dose, then the ODE over ``ii``), found by Newton's method
    and differentiated by the implicit function theorem (no long train of doses is solved, and
    a nonlinear model's steady state is exact to the solver's tolerance). A sequential model
    (:attr:`OdeModel.pk`) has its drug's train in closed form and its PD states periodic."""

    if model.pk is None:

        def step(y, a):
            q, amount, into, dur, interval = a
            one = jnp.zeros(1)
            return solve_doses(
                model.rhs, y, q, one, amount[None], into[None].astype(int), dur[None], interval[None], **tol
            )[0]
    else:

        def step(y, a):
            q, amount, into, dur, interval = a
            one = jnp.zeros(1)
            conc = model.concentration(q, one, amount[None], dur[None], ii=interval[None])
            return solve_doses(
                model.rhs, y, q, one, one, into[None].astype(int), dur[None], interval[None], conc=conc, **tol
            )[0]

    dose = (jnp.asarray(v, float) for v in (amt, state, duration, ii))
    args = ({n: jnp.asarray(v, float) for n, v in p.items()}, *dose)
    tolerance = max(float(tol.get("rtol", 1e-6)), 1e-9)
    return _periodic_state(step, model.initial(p), args, tolerance, jnp.asarray(active, float))


def predict_outputs(
    model: OdeModel,
    theta,
    t_dose,
    amt,
    state,
    duration,
    row_time,
    idx,
    row,
    output,
    t_period=None,
    *,
    ss_ii=None,
    dose_episode=None,
    episode=None,
    **tol,
):
    """Each observation row's output (JAX): ``theta`` (subjects, parameters); doses and
    ``row_time`` (subjects, slots): each subject is solved at its own rows' times (vmapped);
    ``idx``, ``row`` (the row's slot), ``output`` (rows) pick each row's value. With
    ``t_period`` (subjects, periods; see :func:`solve_doses`), ``theta`` is (subjects, periods,
    parameters) and each row's output uses its own period's parameters. Resets and steady
    state (:func:`solve_doses`): ``dose_episode`` and ``ss_ii`` (subjects, dose slots; a dose
    with ``ss_ii`` > 0 starts from :func:`steady_state`, with the parameters in force at its
    time), ``episode`` (rows)."""
    names = model.parameters
    resets, steady = dose_episode is not None or ss_ii is not None, ss_ii is not None
    extra = (None, None, None)
    if resets:
        dose_episode = jnp.zeros_like(t_dose) if dose_episode is None else dose_episode
        rows = jnp.zeros(idx.shape[0]) if episode is None else episode
        extra = (ss_ii, dose_episode, jnp.zeros_like(row_time).at[idx, row].set(rows))  # each row slot's episode

    def one(th, td, a, s, d, times, tp, ii, dep, oep):
        p = {n: th[..., j] for j, n in enumerate(names)}
        p0 = p if tp is None else {n: v[0] for n, v in p.items()}
        kw = {}
        if resets:

            def at(t):  # the parameters in force at time t
                if tp is None:
                    return p
                j = jnp.maximum(jnp.sum(tp <= t) - 1, 0)
                return {n: v[j] for n, v in p.items()}

            p_dose = jax.vmap(at)(td)
            y_reset = jax.vmap(model.initial)(p_dose)
            if steady:
                on = ii > 0  # other slots: no solve (inactive), with safe inputs all the same
                y_ss = jax.vmap(lambda q, *x: steady_state(model, q, *x, **tol))(
                    p_dose, jnp.where(on, a, 0.0), s, jnp.where(on, d, 0.0), jnp.where(on, ii, 1.0), on
                )
                y_reset = jnp.where(on[:, None], y_ss, y_reset)
            kw = {"episode": dep, "obs_episode": oep, "y_reset": y_reset, "ss_ii": ii}
        if model.pk is None:
            return solve_doses(model.rhs, model.initial(p0), p, td, a, s, d, times, t_period=tp, **kw, **tol)
        conc = model.concentration(p, td, a, d, ii=kw.get("ss_ii"), episode=kw.get("episode"))
        y = solve_doses(model.rhs, model.initial(p), p, td, jnp.zeros_like(a), s, d, times, conc=conc, **kw, **tol)
        c = jax.vmap(conc)(times, oep) if resets else jax.vmap(conc)(times)
        return jnp.concatenate([y, c[:, None]], axis=1)  # conc rides along as a last column

    if t_period is None:
        states = jax.vmap(lambda th, *a: one(th, *a[:5], None, *a[5:]))(
            theta, t_dose, amt, state, duration, row_time, *extra
        )
        th_rows = theta[idx]
    else:
        states = jax.vmap(one)(theta, t_dose, amt, state, duration, row_time, t_period, *extra)
        t_row = row_time[idx, row]
        period = jnp.maximum(jnp.sum(t_period[idx] <= t_row[:, None], axis=1) - 1, 0)
        th_rows = theta[idx, period]
    y = states[idx, row]  # (subjects, slots, states) -> rows
    p_rows = {n: th_rows[:, j] for j, n in enumerate(names)}
    if model.pk is not None:
        y, p_rows = y[:, :-1], p_rows | {"conc": y[:, -1]}
    values = jnp.stack([jax.vmap(f)(y, p_rows) for f in model.outputs.values()], axis=1)
    return jnp.take_along_axis(values, output[:, None].astype(int), axis=1)[:, 0]


# ---------------------------------------------------------------------------- the family
def resolve_model(model) -> OdeModel:
    """An :class:`OdeModel` from itself, a built-in name, or ``"package.module:name"`` (an
    OdeModel, or a function of no arguments returning one)."""
    if isinstance(model, OdeModel):
        return model
    if not isinstance(model, str):
        raise TypeError(f"model is an OdeModel, a built-in name {sorted(ODE_MODELS)} or 'package.module:name'")
    if model in ODE_MODELS:
        return ODE_MODELS[model]()
    if ":" not in model:
        raise ValueError(f"unknown ODE model {model!r}: built-in {sorted(ODE_MODELS)}, or 'package.module:name'")
    mod, _, qual = model.partition(":")
    if mod == "object":
        raise FamilyError(
            f"the ODE model {qual} was given as an object, so a model card cannot name it: pass its import "
            "path 'package.module:name' (a module another process can import) to save or load this family"
        )
    obj = import_object(model, "the ODE model", "this family")
    obj = obj() if callable(obj) and not isinstance(obj, OdeModel) else obj
    if not isinstance(obj, OdeModel):
        raise FamilyError(f"{model} is not an OdeModel (or a function returning one)")
    return OdeModel(**{**obj.__dict__, "path": model})


@register_family
class Ode(Pk):
    """Population PK/PD family of an ODE model (see the module docstring).

    ``steady_state=True`` builds the steady-state solve (:func:`steady_state`) into the program,
    for event tables with SS=1 records (refused without it: it costs compile time).

    Examples
    --------
    >>> fam = Ode("friberg", observations={1: "conc", 6: "anc"}, error={"conc": "proportional", "anc": "exponential"})
    >>> fam.parameters
    ('cl', 'v', 'mtt', 'gamma', 'circ0', 'slope')
    """

    #: Not across sites yet: its residual priors are scaled by each output's own spread.
    federated_priors = None

    name = "ode"
    inputs = Pk.inputs | {
        "dose_state": Axis("patient", "dose"),  # the state each dose enters
        "output": Axis("obs"),  # which output each row measures
        # each subject is solved at its own rows' times only: a padded axis of them, and each
        # row's position on it (solving every subject at every row's time cost n_subjects x more)
        "row_time": Axis("patient", "row"),
        "obs_row": Axis("obs"),
        # parameter periods (time-varying covariates, occasions): when each starts (the first
        # -inf, padding +inf), the covariates in force (the ``cov`` columns) and its occasion
        "t_period": Axis("patient", "period", fill=np.inf),
        "cov_period": Axis("patient", "period", fill=1.0),  # a padded period's values: finite in any effect
        "occ_period": Axis("patient", "period"),
    }
    #: The population fit starts with a short warmup that learns a first diagonal metric (an ODE
    #: cohort's scales differ a hundredfold: see :func:`bayestwin.engine.fit._prewarm`), from
    #: chains jittered by 0.2 rather than 1 (PyMC's): a Friberg study's chains started 1 apart
    #: stalled at trees of 1,023 steps through the main warmup's first window.
    # chains on several devices: one program per device (shard_map cannot trace diffrax's
    # checkpointed solves yet: bayestwin.engine.fit._start)
    fit_nuts = {"prewarm": 40, "jitter": 0.2, "split": "threads"}
    extra_inputs = ("dose_state", "output", "row_time", "obs_row", "t_period", "cov_period", "occ_period")
    #: ODE twins take longer per step; the importance path with its NUTS fallback is the default
    #: for many twins (the settings are the PK family's).

    def __init__(
        self,
        model: str | OdeModel = "one_compartment",
        error: str | Mapping = "combined",
        observations: Mapping | None = None,
        priors: Mapping | None = None,
        covariates: Mapping | None = None,
        bsv: list | tuple | None = None,
        correlated: bool | list = True,
        rtol: float = 1e-6,
        max_steps: int = 512,
        iov: list | tuple | None = None,
        occasions: str = "OCC",
        max_occasions: int = 8,
        time_varying: list | tuple | None = None,
        centred: bool | list | tuple = False,
        steady_state: bool = False,
    ):
        self.ode = resolve_model(model)
        # what the card stores; "object:<name>" cannot be rebuilt, so save refuses it before writing
        self.model = model if isinstance(model, str) else (self.ode.path or f"object:{self.ode.name}")
        self.compartments, self.route, self.parameterisation, self.lag, self.weight = None, "ode", "ode", False, None
        self.bioavailability = False  # (the ODE model routes doses itself)
        outputs = list(self.ode.outputs)
        self.observations = {int(k): v for k, v in (observations or {0: outputs[0]}).items()}
        for cmt, out in self.observations.items():
            if out not in outputs:
                raise ValueError(f"observations: CMT {cmt} -> {out!r} is not an output of {self.ode.name} ({outputs})")
        kinds = error if isinstance(error, Mapping) else dict.fromkeys(outputs, error)
        for out, kind in kinds.items():
            if out not in outputs:
                raise ValueError(f"error: {out!r} is not an output of {self.ode.name} ({outputs})")
            if kind not in ODE_ERRORS:
                raise ValueError(f"error must be one of {ODE_ERRORS}, not {kind!r}")
        self.error = error if isinstance(error, str) else dict(error)
        self.errors = {o: kinds.get(o, "combined") for o in outputs}
        if not (isinstance(rtol, float) and 0 < rtol < 1e-2):
            raise ValueError(f"rtol must be a float in (0, 0.01), not {rtol!r}")
        self.rtol = rtol
        if not (isinstance(max_steps, int) and 16 <= max_steps <= 100_000):
            raise ValueError(f"max_steps must be a whole number in [16, 100000], not {max_steps!r}")
        self.max_steps = max_steps
        if not isinstance(steady_state, bool):
            raise TypeError(f"steady_state must be True or False, not {steady_state!r}")
        self.steady_state = steady_state
        self.iov = [] if iov is None else [self._parameter(p, "iov").upper() for p in _listed(iov, "iov")]
        if len(set(self.iov)) < len(self.iov):
            raise ValueError(f"a parameter is listed twice in iov={iov!r}")
        if occasions not in ("OCC", "dose"):
            raise ValueError(
                f"occasions must be 'OCC' (the OCC column) or 'dose' (each dose record), not {occasions!r}"
            )
        if not (isinstance(max_occasions, int) and 1 <= max_occasions <= 100):
            raise ValueError(f"max_occasions must be a whole number in [1, 100], not {max_occasions!r}")
        self.occasions, self.max_occasions = occasions, max_occasions
        self._structure(
            priors, covariates, bsv, correlated, centred, extra_priors={"iov_sd"} if self.iov else frozenset()
        )
        used = self.effect_columns
        declared = [] if time_varying is None else _listed(time_varying, "time_varying")
        self.time_varying = [str(c).upper() for c in declared]
        for c in self.time_varying:
            if c not in used:
                raise ValueError(
                    f"time_varying: {c} is not in the covariate model (covariates= uses {used}): only a "
                    "covariate that acts on a parameter can vary with time"
                )
        if (self.iov or self.time_varying) and self.ode.pk is not None:
            raise ValueError(
                f"{self.ode.name} has its PK in closed form with constant parameters: inter-occasion "
                "variability and time-varying covariates need the full ODE model"
            )
        if self.iov:
            self.patient_vars = ("z", "z_occ")

    @property
    def periodic(self) -> bool:
        """Whether parameters may change within a subject (IOV or time-varying covariates)."""
        return bool(self.iov or self.time_varying)

    @property
    def parameters(self) -> tuple[str, ...]:
        return tuple(self.ode.parameters)

    @property
    def residual_params(self) -> tuple[str, ...]:
        """Residual-error parameters, one set per observed output (the primary output's unsuffixed)."""
        names = []
        for out, kind in self.errors.items():
            if out not in self.observations.values():
                continue
            suffix = "" if out == self.primary else f"_{out}"
            if kind in ("additive", "combined", "exponential"):
                names.append(f"sigma_add{suffix}")
            if kind in ("proportional", "combined"):
                names.append(f"sigma_prop{suffix}")
        return tuple(names)

    @property
    def default_dose_state(self) -> int:
        return self.ode.default_state

    @property
    def primary(self) -> str:
        """The output forecasts report (the first observed one)."""
        return next(o for o in self.ode.outputs if o in self.observations.values())

    # ----------------------------------------------------------------- data
    def check(self, frame: pd.DataFrame, covariates) -> None:
        """Refuse what this family does not model: SS=2 (a steady state added to the current
        state: superposition, which a nonlinear model does not have), SS=1 unless the family was
        built with ``steady_state=True``, a steady-state infusion longer than its interval, TIME
        that goes back at a reset (one clock per subject), doses into a CMT that is not a state,
        observations of a CMT not in ``observe``, covariates that change within an ID but are
        not declared ``time_varying``, occasions (OCC) without ``iov``."""
        fail = record_check(frame)
        evid = frame["EVID"].to_numpy()
        ss = frame["SS"].to_numpy() if "SS" in frame else np.zeros(len(frame))
        fail(
            "SS=2 (a steady state added to what is there) assumes superposition, which holds for linear "
            "models only: the ODE family models SS=1 (give the earlier doses, or use the closed-form PK family)",
            ss == 2,
            "SS",
        )
        fail(
            "a steady-state dose (SS=1) needs Ode(..., steady_state=True), which solves each dose's "
            "steady state in the program",
            (ss == 1) & (not self.steady_state),
            "SS",
        )
        refuse_long_steady_infusions(frame, fail)
        ids, time = frame["ID"].to_numpy(), frame["TIME"].to_numpy(float)
        back = np.r_[False, (ids[1:] == ids[:-1]) & (time[1:] < time[:-1])]
        fail(
            "TIME goes back at this reset: the ODE family solves one clock per ID (keep TIME "
            "non-decreasing through resets)",
            back,
            "TIME",
        )
        refuse_time_varying(frame, [c for c in covariates if c not in self.time_varying], fail)
        if not (self.iov and self.occasions == "OCC"):
            refuse_occasions(
                frame,
                fail,
                "this population has no inter-occasion variability from OCC (iov=[...], occasions='OCC')"
                if not self.iov
                else "occasions='dose' ignores OCC (leave the column out, or use occasions='OCC')",
            )
        cmt = frame["CMT"].to_numpy(int)
        dose, obs = np.isin(evid, [1, 4]), evid == 0
        fail(
            f"a dose goes into CMT 1..{len(self.ode.states)} (the states {list(self.ode.states)}) or 0 (the default)",
            dose & (cmt > len(self.ode.states)),
            "CMT",
        )
        fail(
            f"an observation's CMT must be one of {sorted(self.observations)} (observations= maps CMT to output)",
            obs & ~np.isin(cmt, list(self.observations)),
            "CMT",
        )
        ids = frame["ID"].to_numpy()
        has_dose = pd.Series(dose).groupby(ids).transform("any").to_numpy()
        fail("levels of an ID that has no dose record", obs & ~has_dose & self._drug_rows(frame), "EVID")

    def _drug_rows(self, frame) -> np.ndarray:
        return np.ones(len(frame), bool)

    def routed_doses(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Every dose (ADDL expanded) with INPUT (1 infusion, 0 bolus) and STATE (its state index),
        and a dose of 0 at each EVID 3 reset: each later episode then starts with a dose slot, the
        one :func:`solve_doses` resets the state at."""
        from bayestwin.data.nonmem import expand_doses

        if "EVID" in frame and (frame["EVID"] == 3).any():
            frame = frame.copy()
            reset = (frame["EVID"] == 3).to_numpy()
            frame.loc[reset, "EVID"] = 4  # a reset and a dose, of nothing
            frame.loc[reset, [c for c in ("AMT", "RATE", "SS", "II", "ADDL") if c in frame]] = 0
        doses = expand_doses(frame)
        cmt = doses["CMT"].to_numpy(int)
        doses["INPUT"] = (doses["DURATION"].to_numpy(float) > 0).astype(float)
        doses["STATE"] = np.where(cmt > 0, cmt - 1, self.ode.default_state).astype(float)
        return doses

    DOSE_COLUMNS = Pk.DOSE_COLUMNS | {"dose_state": "STATE"}

    def obs_inputs(self, obs: pd.DataFrame, patients: list) -> dict:
        outputs = list(self.ode.outputs)
        index = {p: i for i, p in enumerate(patients)}
        who = obs["ID"].map(index).to_numpy(np.int64)  # typed: a subject may have no rows yet
        row = pd.Series(who).groupby(who).cumcount().to_numpy(np.int64)
        row_time = np.zeros((len(patients), max(int(row.max()) + 1 if len(row) else 0, 1)))
        row_time[who, row] = obs["TIME"].to_numpy(float)
        return {
            "output": np.array([outputs.index(self.observations[int(c)]) for c in obs["CMT"]], float),
            "obs_row": row.astype(float),
            "row_time": row_time,
        }

    def design(self, frame: pd.DataFrame, baseline: pd.DataFrame, schema: Schema) -> Design:
        """:meth:`Pk.design` and each subject's parameter periods (:meth:`period_inputs`)."""
        design = super().design(frame, baseline, schema)
        design.data |= self.period_inputs(frame, design.patients, schema)
        return design

    def period_inputs(self, frame: pd.DataFrame, patients: list, schema: Schema) -> dict:
        """``t_period``, ``cov_period``, ``occ_period`` (subjects, periods): a subject's first
        period starts at -inf with its first record's covariates; a new one starts at each
        record where a ``time_varying`` covariate or (with ``iov``) the occasion changes, and
        holds until the next (last observation carried forward: a value recorded at t applies
        from t on, an observation at t included)."""
        from bayestwin.errors import DataError

        fail = record_check(frame)
        ids = frame["ID"].to_numpy()
        new_id = np.r_[True, ids[1:] != ids[:-1]]
        occ = occasions(frame, self.occasions) if self.iov else np.zeros(len(frame), int)
        fail(
            f"this ID has more occasions than max_occasions={self.max_occasions} (raise it when building the family)",
            occ >= self.max_occasions,
            "OCC" if self.occasions == "OCC" else "EVID",
        )
        starts = new_id | np.r_[False, occ[1:] != occ[:-1]]
        for c in self.time_varying:
            values = frame[c]
            if c in schema.categorical:
                known = list(schema.categorical[c])
                fail(f"{c} takes a level not seen at baseline (levels: {known})", ~values.astype(str).isin(known), c)
            elif any(e.column == c and e.kind == "power" for es in self.effects.values() for e in es):
                fail(f"a power effect needs {c} > 0 (it is (x / ref) ** exponent)", values.to_numpy(float) <= 0, c)
            starts |= values.ne(values.shift()).to_numpy(bool)
        rows = frame[starts]
        index = {p: i for i, p in enumerate(patients)}
        mapped = rows["ID"].map(index)
        if mapped.isna().any():
            raise DataError("the records hold an ID that is not among the subjects", column="ID")
        who = mapped.to_numpy(np.int64)
        k = pd.Series(who).groupby(who).cumcount().to_numpy(np.int64)
        P = max(int(k.max()) + 1 if len(k) else 1, 1)
        n = len(patients)
        t_period = np.full((n, P), np.inf)
        t_period[who, k] = np.where(k == 0, -np.inf, rows["TIME"].to_numpy(float))
        cov = self._cov_matrix(rows, schema)
        cov_period = np.ones((n, P, cov.shape[1]))  # padding as the Axis fill: finite in any effect's term
        cov_period[who, k] = cov
        occ_period = np.zeros((n, P))
        occ_period[who, k] = occ[starts]
        return {"t_period": t_period, "cov_period": cov_period, "occ_period": occ_period}

    def covariate_arrays(self, baseline: pd.DataFrame, schema: Schema) -> dict:
        """:meth:`Pk.covariate_arrays` and one parameter period per subject (virtual subjects'
        covariates do not change; their occasion is the first)."""
        out = super().covariate_arrays(baseline, schema)
        n = len(baseline)
        out["t_period"] = np.full((n, 1, 1), -np.inf)
        out["cov_period"] = out["cov"][:, :, None, :]
        out["occ_period"] = np.zeros((n, 1, 1))
        return out

    def forecast_inputs(self, events, schema: Schema, regimens=None, times=None, start=None, output=None):
        """:meth:`Pk.forecast_inputs`, of ``output`` (default: the first observed output). The
        parameters of each subject's last period (its current occasion, its latest covariates)
        hold over the forecast."""
        self._check_output(output)
        labels, times, data = super().forecast_inputs(events, schema, regimens, times, start)
        if output is not None:
            data["output"] = np.full_like(data["output"], float(list(self.ode.outputs).index(output)))
        periods = self.period_inputs(events.frame, events.patients, schema)
        B, S = len(events.patients), len(labels)
        for name, arr in periods.items():
            data[name] = np.broadcast_to(arr[:, None, None], (B, S, 1, *arr.shape[1:])).copy()
        return labels, times, data

    def _check_output(self, output) -> None:
        if output is not None and output not in self.observations.values():
            observed = sorted(set(self.observations.values()))
            raise ValueError(f"output {output!r} is not observed by this population (observed: {observed})")

    def _forecast_extra(self, plans: list, shape: tuple, m: int, times) -> dict:
        B, S, T = shape

        def widen(a):
            return np.concatenate([a, np.zeros((a.shape[0], m - a.shape[1]))], axis=1)

        primary = float(list(self.ode.outputs).index(self.primary))
        return {
            "dose_state": np.stack([widen(pl["state"]) for pl in plans])[:, :, None, :],
            "output": np.full((B, S, T), primary),
            "obs_row": np.broadcast_to(np.arange(T, dtype=float), (B, S, T)).copy(),
            "row_time": np.broadcast_to(times[None, None, None, :], (B, S, 1, T)).copy(),
        }

    def template_design(
        self, schema: Schema, n_obs: int, dose: int = 1, row: int | None = None, period: int = 1
    ) -> Design:
        design = super().template_design(schema, n_obs, dose)
        design.data["dose_state"] = np.zeros((1, dose))
        design.data["output"] = np.zeros(n_obs)
        design.data["obs_row"] = np.arange(n_obs, dtype=float)
        design.data["row_time"] = np.zeros((1, n_obs if row is None else row))
        n_cov = design.data["cov"].shape[1]
        design.data["t_period"] = np.r_[-np.inf, np.full(period - 1, np.inf)][None, :]
        design.data["cov_period"] = np.ones((1, period, n_cov))
        design.data["occ_period"] = np.zeros((1, period))
        return design

    # ---------------------------------------------------------------- model
    def default_priors(self, schema: Schema, design: Design) -> dict:
        """Log-normal typical values around the model's ``centres`` (SD 1 on the log scale, moved
        for the reference subject as in :meth:`Pk.default_priors`); per output, residual SDs on
        that output's own scale."""
        from bayestwin.families import pk_covariates as pkc
        from bayestwin.families.pk_covariates import coefficient_name

        shift = self._typical_shift(design, schema)
        pri = {
            f"log_{p}": Prior("Normal", mu=float(np.log(self.ode.centres[p]) - shift[p]), sigma=1.0)
            for p in self.parameters
        }
        for p, effects in self.effects.items():
            for e in effects:
                if not (e.kind == "power" and e.exponent is not None):
                    pri[coefficient_name(p, e)] = pkc.prior(p, e, schema.numeric.get(e.column, (0.0, 1.0))[1])
        pri |= {"bsv_sd": Prior("Gamma", alpha=2.0, beta=4.0), "bsv_corr_eta": 2.0}
        if self.iov:
            pri["iov_sd"] = Prior("HalfNormal", sigma=0.3)
        outputs = list(self.ode.outputs)
        y, which, blq = (np.asarray(design.data[k]) for k in ("y_obs", "output", "blq"))
        for out in self.errors:
            rows = (which == outputs.index(out)) & (blq == 0)
            scale = float(np.std(y[rows])) if rows.sum() > 1 and np.std(y[rows]) > 0 else 1.0
            suffix = "" if out == self.primary else f"_{out}"
            kind = self.errors[out]
            pri[f"sigma_add{suffix}"] = Prior("HalfNormal", sigma=0.5 if kind == "exponential" else scale)
            pri[f"sigma_prop{suffix}"] = Prior("HalfNormal", sigma=0.5)
        return {k: v for k, v in pri.items() if not k.startswith("sigma_") or k in self.residual_params}

    def _derived(self, theta: dict) -> dict:
        return theta

    def _dims(self, name: str) -> tuple[str, ...]:
        return ("patient", "period", "cov_column") if name == "cov_period" else super()._dims(name)

    def _time_terms(self, pri, cov, inputs: dict, schema: Schema) -> dict:
        """``log_shift`` (subject, period, parameter): each period's log-scale change from the
        subject's own parameters, by its covariates' change (``time_varying``) and its
        occasion's deviation (``iov``: ``iov_sd`` times the subject's N(0, 1) offsets ``z_occ``
        per occasion, a patient variable the twin conditions on)."""
        if not self.periodic:
            return {}
        # no shape arithmetic here: the twin's JAX program traces it, and shapes must stay static
        cp = inputs["cov_period"]
        k = len(self.parameters)
        shift = pt.zeros_like(inputs["t_period"])[:, :, None] * np.zeros(k)  # (subject, period, parameter)
        if self.time_varying:
            shift = self._covariate_terms(pri, cp, schema) - self._covariate_terms(pri, cov, schema)[:, None, :]
        if self.iov:
            model = pm.modelcontext(None)
            names = [p.lower() for p in self.iov]
            model.add_coord("iov_param", names)
            model.add_coord("occasion", np.arange(self.max_occasions))
            sd = pri["iov_sd"].create("iov_sd", dims="iov_param")
            z = pm.Normal("z_occ", 0.0, 1.0, dims=("patient", "occasion", "iov_param"))
            hot = pt.eq(inputs["occ_period"][:, :, None], np.arange(self.max_occasions))  # (subject, period, occasion)
            dev = (hot[:, :, :, None] * z[:, None, :, :]).sum(axis=2) * sd  # (subject, period, iov parameter)
            select = np.zeros((len(names), k))
            select[np.arange(len(names)), [self.parameters.index(p) for p in names]] = 1.0
            shift = shift + dev @ select
        return {"log_shift": shift}

    def levels(self, theta: dict, d: dict):
        """Each observation row's output from the ODE solution (a JAX op in the graph)."""
        from pytensor.link.jax.ops import JAXOp
        from pytensor.tensor import TensorType

        model, rtol, max_steps = self.ode, self.rtol, self.max_steps
        periodic = "log_shift" in d

        steady = self.steady_state

        def fn(th, t_dose, amt, duration, infusion, state, row_time, ss_ii, dose_ep, idx, row, output, episode, *tp):
            dur = jnp.where(infusion > 0.5, duration, 0.0)
            values = predict_outputs(
                model,
                th,
                t_dose,
                amt,
                state.astype(int),
                dur,
                row_time,
                idx,
                row.astype(int),
                output,
                t_period=tp[0] if tp else None,
                ss_ii=ss_ii if steady else None,  # (without steady_state, SS records are refused)
                dose_episode=dose_ep,
                episode=episode,
                rtol=rtol,
                atol=rtol * 1e-3,
                max_steps=max_steps,
            )
            return (values,)

        mat, vec = TensorType("float64", shape=(None, None)), TensorType("float64", shape=(None,))
        ivec = TensorType("int64", shape=(None,))
        th = pt.stack([theta[p] for p in self.parameters], axis=1)
        keys = ("t_dose", "amt", "duration", "infusion", "dose_state", "row_time", "ss_ii", "dose_episode")
        args = [pt.cast(d[k], "float64") for k in keys]
        idx = pt.cast(d["patient_idx"], "int64")
        rows = (idx, d["obs_row"], d["output"], pt.cast(d["episode"], "float64"))
        if not periodic:
            op = JAXOp([mat] * 9 + [ivec, vec, vec, vec], [vec], fn, name=f"ode_{model.name}")
            return op(th, *args, *rows)
        # each period's parameters: the subject's own, moved by the period's covariates and occasion
        th = pt.exp(pt.log(th)[:, None, :] + d["log_shift"])
        cube = TensorType("float64", shape=(None, None, None))
        op = JAXOp([cube] + [mat] * 8 + [ivec, vec, vec, vec, mat], [vec], fn, name=f"ode_{model.name}_periods")
        return op(th, *args, *rows, pt.cast(d["t_period"], "float64"))

    def _likelihood(self, pri, conc, blq, y_obs, d: dict) -> None:
        """Each row's residual error by its output's kind; BLQ rows by the M3 method."""
        outputs = list(self.ode.outputs)
        which = d["output"]
        # rows start at sd 1, never 0: PyTensor pushes the division by sd into each branch of the
        # per-output switch, and a 0 in a branch not taken makes 0/0 in JAX's gradient (NaN)
        sd = pt.ones_like(conc)
        is_log = pt.zeros_like(conc)
        for out, kind in self.errors.items():
            if out not in self.observations.values():
                continue
            suffix = "" if out == self.primary else f"_{out}"
            rows = pt.eq(which, outputs.index(out))
            s_add = (
                pri[f"sigma_add{suffix}"].create(f"sigma_add{suffix}")
                if f"sigma_add{suffix}" in pri and kind != "proportional"
                else 0.0
            )
            s_prop = (
                pri[f"sigma_prop{suffix}"].create(f"sigma_prop{suffix}")
                if kind in ("proportional", "combined")
                else 0.0
            )
            if kind == "exponential":
                s = s_add + pt.zeros_like(conc)
                is_log = pt.where(rows, 1.0, is_log)
            else:
                s = pt.sqrt(s_add**2 + (s_prop * conc) ** 2) + 1e-9
            sd = pt.where(rows, s, sd)
        pm.CustomDist("y", conc, sd, blq, is_log, logp=_mixed_logp, random=_mixed_random, observed=y_obs, dims="obs")

    def concentration(self, *args, **kwargs):
        raise NotImplementedError(
            "dose_search and closed-form concentrations are for the analytic PK family; an ODE model's "
            "regimens are compared with twin.predict(regimens=[...])"
        )

    def observe(self, key, mu, params: Mapping, output: str | None = None) -> jax.Array:
        """A new measurement of ``output`` (default: the forecast output) around ``mu`` with its
        residual error."""
        out = output or self.primary
        self._check_output(out)
        kind, suffix = self.errors[out], "" if out == self.primary else f"_{out}"
        eps = jax.random.normal(key, mu.shape)
        if kind == "exponential":
            return mu * jnp.exp(params[f"sigma_add{suffix}"] * eps)
        sd = 0.0
        if kind in ("additive", "combined"):
            sd = sd + params[f"sigma_add{suffix}"] ** 2
        if kind in ("proportional", "combined"):
            sd = sd + (params[f"sigma_prop{suffix}"] * mu) ** 2
        return mu + jnp.sqrt(sd) * eps


def _mixed_logp(value, mu, sigma, blq, is_log):
    """Normal log density (or M3 for BLQ rows) of the level, on the log scale where ``is_log``."""
    on_log = is_log > 0
    v = pt.where(on_log, pt.log(pt.maximum(value, 1e-300)), value)
    m = pt.where(on_log, pt.log(pt.maximum(mu, 1e-300)), mu)
    z = (v - m) / sigma
    log_pdf = -0.5 * z**2 - pt.log(sigma) - 0.5 * np.log(2 * np.pi)
    return pt.where(blq > 0, log_ndtr(pt.where(blq > 0, z, 0.0)), log_pdf)


def _mixed_random(mu, sigma, blq, is_log, rng=None, size=None):
    eps = rng.normal(size=size if size is not None else np.shape(mu))
    return np.where(is_log > 0, mu * np.exp(sigma * eps), mu + sigma * eps)


# ------------------------------------------------------------------------ built-in models
def one_compartment(oral: bool = True) -> OdeModel:
    """The linear one-compartment model (first-order absorption when ``oral``) as an ODE: the
    analytic PK family's model, for checks (its closed forms are exact and faster)."""

    def rhs(t, y, p):
        k = p["cl"] / p["v"]
        if oral:
            return jnp.stack([-p["ka"] * y[0], p["ka"] * y[0] - k * y[1]])
        return jnp.stack([-k * y[0]])

    states = ("depot", "central") if oral else ("central",)
    params = ("cl", "v", "ka") if oral else ("cl", "v")
    return OdeModel(
        name="one_compartment" if oral else "one_compartment_iv",
        states=states,
        parameters=params,
        rhs=rhs,
        outputs={"conc": lambda y, p: y[-1] / p["v"]},
        centres={"cl": 2.0, "v": 30.0, "ka": 1.0},
    )


def michaelis_menten(oral: bool = False) -> OdeModel:
    """One compartment with saturable (Michaelis-Menten) elimination: dA/dt = -Vmax C / (Km + C),
    C = A / V (first-order absorption from a depot when ``oral``)."""

    def rhs(t, y, p):
        c = y[-1] / p["v"]
        elim = p["vmax"] * c / (p["km"] + c)
        if oral:
            return jnp.stack([-p["ka"] * y[0], p["ka"] * y[0] - elim])
        return jnp.stack([-elim])

    return OdeModel(
        name="michaelis_menten",
        states=("depot", "central") if oral else ("central",),
        parameters=("vmax", "km", "v", "ka") if oral else ("vmax", "km", "v"),
        rhs=rhs,
        outputs={"conc": lambda y, p: y[-1] / p["v"]},
        centres={"vmax": 50.0, "km": 5.0, "v": 30.0, "ka": 1.0},
    )


def effect_emax() -> OdeModel:
    """IV one-compartment PK, an effect compartment (ke0) and a sigmoid Emax effect:
    E = e0 + emax Ce^hill / (ec50^hill + Ce^hill). Outputs ``conc`` and ``effect``."""

    def rhs(t, y, p):
        c = y[0] / p["v"]
        return jnp.stack([-p["cl"] / p["v"] * y[0], p["ke0"] * (c - y[1])])

    def effect(y, p):
        ce = jnp.maximum(y[1], 0.0)
        return p["e0"] + p["emax"] * ce ** p["hill"] / (p["ec50"] ** p["hill"] + ce ** p["hill"])

    return OdeModel(
        name="effect_emax",
        states=("central", "effect_site"),
        parameters=("cl", "v", "ke0", "e0", "emax", "ec50", "hill"),
        rhs=rhs,
        outputs={"conc": lambda y, p: y[0] / p["v"], "effect": effect},
        centres={"cl": 2.0, "v": 30.0, "ke0": 0.5, "e0": 10.0, "emax": 50.0, "ec50": 2.0, "hill": 1.5},
    )


def indirect_response() -> OdeModel:
    """IV one-compartment PK and a turnover response R with production inhibited by the drug:
    dR/dt = kin (1 - imax C / (ic50 + C)) - kout R, R(0) = kin / kout (Dayneka et al., J
    Pharmacokinet Biopharm 1993; 21: 457-78, model I). Outputs ``conc`` and ``response``."""

    def rhs(t, y, p):
        c = y[0] / p["v"]
        inhibition = p["imax"] * c / (p["ic50"] + c)
        return jnp.stack([-p["cl"] / p["v"] * y[0], p["kin"] * (1 - inhibition) - p["kout"] * y[1]])

    return OdeModel(
        name="indirect_response",
        states=("central", "response"),
        parameters=("cl", "v", "kin", "kout", "imax", "ic50"),
        rhs=rhs,
        outputs={"conc": lambda y, p: y[0] / p["v"], "response": lambda y, p: y[1]},
        centres={"cl": 2.0, "v": 30.0, "kin": 10.0, "kout": 0.1, "imax": 0.8, "ic50": 2.0},
        init=lambda p: jnp.stack([0.0, p["kin"] / p["kout"]]),
    )


def friberg() -> OdeModel:
    """IV one-compartment PK and the semi-mechanistic myelosuppression model of Friberg et al.
    (J Clin Oncol 2002; 20: 4713-21): a proliferating pool, three transit compartments and the
    circulating neutrophils, ktr = 4 / mtt, feedback (circ0 / circ)^gamma on proliferation, and
    a linear drug effect slope x C inhibiting it. All pools start at circ0 (steady state).
    Outputs ``conc`` (central / V) and ``anc`` (circulating neutrophils, the unit of circ0).
    Typical values: mtt 84 h, gamma 0.16, circ0 5 x 10^9/L (docetaxel, Friberg et al. 2002);
    PK as one compartment with CL 36 L/h and V 10 L (an end-of-infusion level of about 3.6 mg/L
    after 135 mg over 1 h, of the order reported for docetaxel; its later phases are left out);
    slope 10 per mg/L (illustrative, not a published value).

    Stiff as an ODE: elimination (3.6 / h) is 75 times faster than the transit (4 / 84 h), so
    an explicit solver's step stays near 1 h long after the drug is gone (about 500 steps per
    3-week cycle; a gradient for 30 subjects over two cycles took 187 ms with Tsit5, 762 ms
    with the implicit Kvaerno5). Give it ``max_steps`` to match (:class:`Ode` ``max_steps=``)."""

    def rhs(t, y, p):
        ktr = 4.0 / p["mtt"]
        c = y[0] / p["v"]
        drug = p["slope"] * c  # linear, as published; above 1 the pool shrinks (it stays positive)
        feedback = (p["circ0"] / jnp.maximum(y[5], 1e-9)) ** p["gamma"]
        prol, t1, t2, t3, circ = y[1], y[2], y[3], y[4], y[5]
        return jnp.stack(
            [
                -p["cl"] / p["v"] * y[0],
                ktr * prol * (1 - drug) * feedback - ktr * prol,
                ktr * (prol - t1),
                ktr * (t1 - t2),
                ktr * (t2 - t3),
                ktr * (t3 - circ),
            ]
        )

    return OdeModel(
        name="friberg",
        states=("central", "prol", "transit1", "transit2", "transit3", "circ"),
        parameters=("cl", "v", "mtt", "gamma", "circ0", "slope"),
        rhs=rhs,
        outputs={"conc": lambda y, p: y[0] / p["v"], "anc": lambda y, p: y[5]},
        centres={"cl": 36.0, "v": 10.0, "mtt": 84.0, "gamma": 0.16, "circ0": 5.0, "slope": 10.0},
        init=lambda p: jnp.stack([0.0] + [p["circ0"]] * 5),
    )


def friberg_sequential() -> OdeModel:
    """:func:`friberg` with its PK in closed form (``pk="iv1"``): the five PD pools are the only
    states, so the fast elimination makes no stiff ODE. Same parameters, outputs and typical values."""
    full = friberg()

    def rhs(t, y, p):
        ktr = 4.0 / p["mtt"]
        drug = p["slope"] * p["conc"]
        feedback = (p["circ0"] / jnp.maximum(y[4], 1e-9)) ** p["gamma"]
        return jnp.stack(
            [
                ktr * y[0] * (1 - drug) * feedback - ktr * y[0],
                ktr * (y[0] - y[1]),
                ktr * (y[1] - y[2]),
                ktr * (y[2] - y[3]),
                ktr * (y[3] - y[4]),
            ]
        )

    return OdeModel(
        name="friberg_sequential",
        states=("prol", "transit1", "transit2", "transit3", "circ"),
        parameters=full.parameters,
        rhs=rhs,
        outputs={"conc": lambda y, p: p["conc"], "anc": lambda y, p: y[4]},
        centres=full.centres,
        init=lambda p: jnp.stack([p["circ0"]] * 5),
        pk="iv1",
    )


#: Built-in ODE models by name (functions of no arguments returning an :class:`OdeModel`).
ODE_MODELS = {
    "one_compartment": one_compartment,
    "one_compartment_iv": lambda: one_compartment(oral=False),
    "michaelis_menten": michaelis_menten,
    "effect_emax": effect_emax,
    "indirect_response": indirect_response,
    "friberg": friberg,
    "friberg_sequential": friberg_sequential,
}


def simulate(
    model: str | OdeModel,
    n_subjects: int = 30,
    *,
    doses=((0.0, 135.0, 1.0),),
    schedule: Mapping[str, tuple] | None = None,
    observations: Mapping[int, str] | None = None,
    typical: Mapping[str, float] | None = None,
    bsv: Mapping[str, float] | None = None,
    error: Mapping[str, tuple[str, float]] | None = None,
    seed: int = 0,
    id_start: int = 1,
    max_steps: int = 20_000,
) -> tuple[pd.DataFrame, dict]:
    """Simulate a PK/PD study of an ODE model as a NONMEM event table, with the truth.

    Every subject gets ``doses`` ((time, amount, duration): duration 0 a bolus, else an
    infusion) into the model's dose state, and is observed at ``schedule[output]`` times for each
    output, with CMT from ``observations`` ({CMT: output}; default: 1, 2, ... in output order).
    Parameters are log-normal around ``typical`` (default: the model's ``centres``) with SDs
    ``bsv`` (default 0.2 for each); residual error per output ``error[output] = (kind, sigma)``
    with kind ``"proportional"`` or ``"exponential"`` (default proportional 0.1).

    Returns
    -------
    table : DataFrame with ID, TIME, AMT, DV, EVID, CMT, RATE
    truth : dict with ``typical``, ``bsv``, ``error`` and each subject's parameters (by ID)

    Examples
    --------
    >>> table, truth = simulate("friberg_sequential", 2, schedule={"conc": (1.0,), "anc": (168.0,)})
    >>> sorted(truth["parameters"])
    [1, 2]
    """
    model = resolve_model(model)
    outputs = list(model.outputs)
    schedule = dict(schedule or {outputs[0]: (0.5, 1.0, 2.0, 6.0, 24.0)})
    observations = dict(observations or {k + 1: o for k, o in enumerate(outputs)})
    cmt_of = {o: c for c, o in observations.items()}
    typical = {p: float(model.centres[p]) for p in model.parameters} | dict(typical or {})
    bsv = dict.fromkeys(model.parameters, 0.2) | dict(bsv or {})
    error = {o: ("proportional", 0.1) for o in outputs} | dict(error or {})
    rng = np.random.default_rng(seed)
    log_theta = np.log([typical[p] for p in model.parameters]) + rng.standard_normal(
        (n_subjects, len(model.parameters))
    ) * np.array([bsv[p] for p in model.parameters])
    theta = np.exp(log_theta)
    t_dose = np.array([d[0] for d in doses], float)
    amt = np.array([d[1] for d in doses], float)
    dur = np.array([d[2] for d in doses], float)
    rows_t = [(o, float(t)) for o in outputs if o in schedule for t in schedule[o]]
    times = np.array([t for _, t in rows_t])
    which = np.array([outputs.index(o) for o, _ in rows_t])
    B = n_subjects
    values = predict_outputs(
        model,
        jnp.asarray(theta),
        jnp.broadcast_to(t_dose, (B, len(t_dose))),
        jnp.broadcast_to(amt, (B, len(amt))),
        jnp.full((B, len(amt)), model.default_state),
        jnp.broadcast_to(dur, (B, len(dur))),
        jnp.broadcast_to(times, (B, len(times))),
        jnp.repeat(jnp.arange(B), len(times)),
        jnp.tile(jnp.arange(len(times)), B),
        jnp.tile(jnp.asarray(which), B),
        rtol=1e-8,
        atol=1e-11,
        max_steps=max_steps,
    )
    f = np.asarray(values).reshape(B, len(times))
    eps = rng.standard_normal(f.shape)
    kind = np.array([error[o][0] for o, _ in rows_t])
    sigma = np.array([error[o][1] for o, _ in rows_t])
    dv = np.where(kind == "exponential", f * np.exp(sigma * eps), f * (1 + sigma * eps))
    dv = np.maximum(dv, 0.0)
    records = []
    for i in range(B):
        pid = id_start + i
        for t0, a, d in doses:
            rate = a / d if d > 0 else 0.0
            records.append({"ID": pid, "TIME": t0, "AMT": a, "DV": np.nan, "EVID": 1, "CMT": 0, "RATE": rate})
        for j, (o, t) in enumerate(rows_t):
            records.append({"ID": pid, "TIME": t, "AMT": 0.0, "DV": dv[i, j], "EVID": 0, "CMT": cmt_of[o], "RATE": 0.0})
    table = pd.DataFrame(records).sort_values(["ID", "TIME", "EVID"], ascending=[True, True, False], kind="stable")
    truth = {
        "typical": typical,
        "bsv": bsv,
        "error": error,
        "parameters": {id_start + i: dict(zip(model.parameters, theta[i].tolist(), strict=True)) for i in range(B)},
    }
    return table.reset_index(drop=True), truth


#: A Friberg study's observations (CMT 1: drug levels; CMT 6: neutrophil counts) and error kinds.
FRIBERG_OBSERVATIONS = {1: "conc", 6: "anc"}
FRIBERG_ERRORS = {"conc": "proportional", "anc": "exponential"}


def simulate_friberg(
    n_subjects: int = 20,
    *,
    cycles: int = 1,
    dose: float = 135.0,
    cycle: float = 504.0,
    levels: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0),
    seed: int = 0,
    id_start: int = 1,
    **kwargs,
) -> tuple[pd.DataFrame, dict]:
    """A simulated docetaxel-like study of ``friberg_sequential``: ``dose`` over 1 h at the start
    of each of ``cycles`` cycles; levels at ``levels`` hours after the first dose (proportional
    error 0.15); neutrophil counts on days 0, 7, 10, 14 of each cycle and at the end of the last
    (log-normal error 0.2); CMT as :data:`FRIBERG_OBSERVATIONS`. ``kwargs`` (``typical``,
    ``bsv``) go to :func:`simulate`.

    The default levels run to 4 h, some fifteen half-lives after the infusion ends (the model's
    one-compartment PK: CL 36 L/h, V 10 L), near an assay's floor in a real study. Levels during
    and just after the infusion (e.g. ``levels=(0.5, 1.0, 1.5, 2.0)``, as the zoo's
    ``docetaxel_friberg`` study has) inform CL and V better."""
    if not isinstance(levels, (list, tuple, np.ndarray)) or not all(
        isinstance(t, numbers.Real) and not isinstance(t, bool) and 0 <= t <= cycle for t in levels
    ):
        raise ValueError(f"levels are hours after the first dose, numbers in [0, {cycle:g}]; not {levels!r}")
    anc = [c * cycle + d for c in range(cycles) for d in (0.0, 168.0, 240.0, 336.0)] + [cycles * cycle]
    return simulate(
        "friberg_sequential",
        n_subjects,
        doses=tuple((c * cycle, dose, 1.0) for c in range(cycles)),
        schedule={"conc": tuple(levels), "anc": tuple(anc)},
        observations=FRIBERG_OBSERVATIONS,
        error={"conc": ("proportional", 0.15), "anc": ("exponential", 0.2)},
        seed=seed,
        id_start=id_start,
        **kwargs,
    )
