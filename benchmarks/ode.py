"""ODE PK/PD twins: bayestwin's batched twins of the Friberg model against a loop of pm.sample
with PyMC's own ODE solver (``pm.ode.DifferentialEquation``: scipy's odeint with forward
sensitivities; sunode, the faster peer, is not installable on these machines).

    .venv/bin/python benchmarks/ode.py [--patients 8] [--peer 2] [--draws 500] [--tune 500]
    .venv/bin/python benchmarks/ode.py --fit 50 [--fit-draws 250]     # + a population fit

The population is the model zoo's ``docetaxel_friberg`` (friberg_sequential: one-compartment PK
in closed form, five PD states; 24 simulated subjects). With ``--fit N`` a population fit of N
simulated subjects (one cycle, levels at 0.5-2 h, counts on days 0-21; CL, V and Circ0 centred as
in the zoo's spec; 4 chains x (``--fit-draws`` warmup + ``--fit-draws`` draws)) is timed first,
with its convergence and its recovery of the simulated typical values. Each new patient has
one cycle: 135 mg over 1 h, levels at 0.5-4 h, neutrophil counts on days 0, 7, 10, 14.
bayestwin conditions all patients in one vectorised NUTS program (population parameters
sampled jointly from their Gaussian approximation); the peer fits each patient alone with the
population fixed at its posterior mean (a simpler problem); its time per NUTS iteration,
measured on a short chain, is scaled to the same work as a bayestwin twin (4 chains x (tune +
draws)). Both report the first
patient's clearance, as a check that they solve the same problem (the peer's short chain is
only a rough check).
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import pandas as pd

KEY = b"benchmark-ode-key-000001"


def patients(n: int, seed: int = 11):
    from bayestwin.families import pk_ode

    return pk_ode.simulate_friberg(n, seed=seed, id_start=5000)


def peer_model(rows: pd.DataFrame, pop: dict):
    """One patient's model in plain PyMC with pm.ode.DifferentialEquation (the population fixed)."""
    import pymc as pm
    import pytensor.tensor as pt

    amt, dur = 135.0, 1.0
    obs = rows[rows.EVID == 0]
    conc_rows, anc_rows = obs[obs.CMT == 1], obs[obs.CMT == 6]
    times = np.sort(np.unique(anc_rows.TIME.to_numpy(float)))
    t_anc = times[times > 0]

    def conc_at(t, cl, v):
        k = cl / v
        rate = amt / dur
        during = rate / cl * (1 - pt.exp(-k * t))
        after = rate / cl * (1 - pt.exp(-k * dur)) * pt.exp(-k * (t - dur))
        return pt.switch(t < dur, during, after)

    def rhs(y, t, p):
        cl, v, mtt, gamma, circ0, slope = (p[i] for i in range(6))
        ktr = 4.0 / mtt
        drug = slope * conc_at(t, cl, v)
        feedback = (circ0 / pt.maximum(y[4], 1e-9)) ** gamma
        return [
            ktr * y[0] * (1 - drug) * feedback - ktr * y[0],
            ktr * (y[0] - y[1]),
            ktr * (y[1] - y[2]),
            ktr * (y[2] - y[3]),
            ktr * (y[3] - y[4]),
        ]

    ode = pm.ode.DifferentialEquation(func=rhs, times=t_anc, n_states=5, n_theta=6, t0=0.0)
    names = ("cl", "v", "mtt", "gamma", "circ0", "slope")
    with pm.Model() as model:
        log_p = pm.Normal("log_p", mu=np.array([pop[f"log_{n}"] for n in names]), sigma=np.array(pop["bsv"]))
        p = pt.exp(log_p)
        y = ode(y0=pt.stack([p[4]] * 5), theta=p)
        c = conc_at(pt.as_tensor(conc_rows.TIME.to_numpy(float)), p[0], p[1])
        pm.Normal("conc", mu=c, sigma=pop["sigma_prop"] * c + 1e-9, observed=conc_rows.DV.to_numpy(float))
        anc = pt.concatenate([p[4][None], y[:, 4]])  # the day-0 count is the baseline
        pm.LogNormal("anc", mu=pt.log(anc), sigma=pop["sigma_add_anc"], observed=anc_rows.DV.to_numpy(float))
    return model


def fit_population(n: int, draws: int, rtol: float | None = None) -> None:
    """Time a population fit of ``n`` simulated Friberg subjects; print its convergence and recovery.
    ``rtol``: the solver's relative tolerance instead of the zoo spec's (the family default, 1e-6)."""
    import arviz as az

    import bayestwin as bt
    from bayestwin.families import pk_ode
    from bayestwin.zoo import model_path, read_spec, spec_family

    study, truth = pk_ode.simulate_friberg(n, levels=(0.5, 1.0, 1.5, 2.0), seed=3)
    family = spec_family(read_spec(model_path("docetaxel_friberg")))  # the zoo model's family, as its spec says
    if rtol is not None:
        from bayestwin.families import from_config

        family = from_config(family.config() | {"rtol": rtol})
    t = time.perf_counter()
    pop = bt.fit(bt.read_nonmem(study, key=KEY), family, draws=draws, tune=draws, chains=4, extend=0, seed=1)
    wall = time.perf_counter() - t
    post, stats = pop.idata.posterior, pop.idata.sample_stats
    names = [f"log_{p}" for p in family.parameters]
    summary = az.summary(pop.idata, var_names=[*names, "bsv_sd"], kind="all")
    rows = []
    for p in family.parameters:
        x = post[f"log_{p}"]
        rows.append(
            {
                "parameter": f"log {p}",
                "truth": np.log(truth["typical"][p]),
                "mean": float(x.mean()),
                "sd": float(x.std()),
                "|error| / sd": abs(float(x.mean()) - np.log(truth["typical"][p])) / float(x.std()),
            }
        )
    print(
        f"population fit: {n} subjects, one cycle, 4 chains x ({draws} + {draws}), solver rtol {family.rtol:g}: "
        f"{wall:.0f} s ({wall / 60:.1f} min)"
    )
    print(
        f"  divergences {int(stats['diverging'].sum())}, leapfrog steps per draw {float(stats['n_steps'].mean()):.0f}, "
        f"max R-hat {summary['r_hat'].max():.3f}, min bulk ESS {summary['ess_bulk'].min():.0f}; verdict: {pop.verdict}"
    )
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda x: f"{x:.3f}"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patients", type=int, default=8, help="new patients conditioned in one bayestwin batch")
    ap.add_argument("--peer", type=int, default=2, help="patients fitted one at a time with pm.sample")
    ap.add_argument("--draws", type=int, default=500)
    ap.add_argument("--tune", type=int, default=500)
    ap.add_argument("--fit", type=int, default=0, help="time a population fit of this many subjects first (0: none)")
    ap.add_argument("--fit-draws", type=int, default=250, help="warmup and draws per chain of that fit")
    ap.add_argument("--rtol", type=float, default=None, help="that fit's ODE solver rtol (default: the zoo spec's)")
    ap.add_argument("--peer-iterations", type=int, default=200, help="one chain per peer patient, half warmup")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    import pymc as pm

    import bayestwin as bt

    if args.fit:
        fit_population(args.fit, args.fit_draws, args.rtol)
    population = bt.load("docetaxel_friberg")
    table, truth = patients(args.patients)
    post = population.idata.posterior
    pop = {f"log_{p}": float(post[f"log_{p}"].mean()) for p in population.family.parameters}
    pop["bsv"] = [float(x) for x in post["bsv_sd"].mean(("chain", "draw")).to_numpy()]
    pop["sigma_prop"] = float(post["sigma_prop"].mean())
    pop["sigma_add_anc"] = float(post["sigma_add_anc"].mean())

    rows = []
    for label, n in (
        ("bayestwin, first batch (compiles)", args.patients),
        ("bayestwin, same shapes again", args.patients),
    ):
        t = time.perf_counter()
        twin = population.condition(table, key=KEY, draws=args.draws, tune=args.tune, method="nuts", seed=len(rows))
        wall = time.perf_counter() - t
        rows.append({"method": label, "patients": n, "wall s": wall, "twins/s": n / wall, "verdict": str(twin.verdict)})
    ours = twin.posterior

    # the peer is slow (odeint with forward sensitivities, ~1 s per NUTS iteration here): each
    # patient gets one chain of --peer-iterations (half warmup), and its time per iteration is
    # scaled to the same work as a bayestwin twin (4 chains x (tune + draws)), said as such
    peer_iter, peer_cl = [], []
    ids = sorted(table.ID.unique())[: args.peer]
    for pid in ids:
        model = peer_model(table[table.ID == pid], pop)
        half = args.peer_iterations // 2
        t = time.perf_counter()
        with model:
            idata = pm.sample(
                draws=half,
                tune=half,
                chains=1,
                cores=1,
                progressbar=False,
                random_seed=1,
                compute_convergence_checks=False,
            )
        peer_iter.append((time.perf_counter() - t) / (2 * half))
        peer_cl.append(float(np.exp(idata.posterior["log_p"].sel(log_p_dim_0=0)).mean()))
    per_twin = float(np.mean(peer_iter)) * 4 * (args.tune + args.draws)
    rows.append(
        {
            "method": f"pm.sample + pm.ode.DifferentialEquation ({2 * (args.peer_iterations // 2)} iterations, scaled)",
            "patients": len(ids),
            "wall s": per_twin * len(ids),
            "twins/s": 1.0 / per_twin,
            "verdict": "(not gated)",
        }
    )
    peer = per_twin
    out = pd.DataFrame(rows)
    out["vs peer"] = out["twins/s"] / (1.0 / peer)
    print(
        f"\ntwins of the zoo's docetaxel_friberg: {args.patients} new patients, 4 chains x ({args.tune} + {args.draws})"
    )
    print(out.to_string(index=False, float_format=lambda x: f"{x:.3g}"))
    print(
        f"\nsame problem? patient {ids[0]}: CL posterior mean bayestwin "
        f"{float(ours['patient_cl'].sel(patient=bt.pseudonymise(ids[0], KEY)).mean()):.2f}, peer {peer_cl[0]:.2f}, "
        f"truth {truth['parameters'][ids[0]]['cl']:.2f}"
    )


if __name__ == "__main__":
    main()
