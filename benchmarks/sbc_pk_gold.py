"""The PK fit SBC's log ka signal (issue 20): is the default fit's posterior of log ka right?

Rebuilds the replicates of ``benchmarks/sbc.py --family pk`` (seed 0: the same design, frozen
priors and prior-predictive data sets) and fits the chosen ones twice: with the SBC's settings
(4 x (1000 + 1000)) and with a long, careful run (4 x (3000 + 4000), target_accept 0.99). Prints
each replicate's true log ka (the log of the excess ka - k), both posteriors' mean and SD, and
the difference of the means in the careful run's SDs. A sampler bias of the size the SBC's mean
rank of 0.56 implies would be about 0.2 SD on average.

    .venv/bin/python benchmarks/sbc_pk_gold.py 0 1 2 3 4 5 135 62 13
"""

from __future__ import annotations

import argparse
import time
import warnings

import jax

from bayestwin.population import fit
from bayestwin.review.sbc import frozen_pk_family, pk_design, prior_replicates


def main(reps: list[int], seed: int = 0, n: int = 200) -> None:
    warnings.simplefilter("ignore")
    design = pk_design(seed)  # the SBC run's design, frozen priors and data sets (review/sbc.py)
    fam = frozen_pk_family(design)
    prior, ys = prior_replicates(design, fam, n, seed)
    truth = prior["log_ka"].to_numpy().ravel()
    print(f"{'rep':>4} {'truth':>7} {'mean':>7} {'sd':>6} {'gold mean':>9} {'gold sd':>7} {'shift/SD':>8} {'s':>5}")
    for r in reps:
        rep = design.with_outcome(ys[r])
        got = []
        for kw in ({"draws": 1000, "tune": 1000}, {"draws": 4000, "tune": 3000, "target_accept": 0.99}):
            t0 = time.perf_counter()
            post = fit(rep, fam, seed=seed + r, progressbar=False, **kw).posterior["log_ka"].to_numpy().ravel()
            jax.clear_caches()
            got.append((post.mean(), post.std(), time.perf_counter() - t0))
        (m, s, t), (gm, gs, _) = got
        print(f"{r:>4} {truth[r]:>7.3f} {m:>7.3f} {s:>6.3f} {gm:>9.3f} {gs:>7.3f} {(m - gm) / gs:>8.3f} {t:>5.0f}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("reps", type=int, nargs="*", default=[0, 1, 2], help="replicate indices, 0-199 (0 1 2)")
    args = ap.parse_args()
    bad = [r for r in args.reps if not 0 <= r < 200]
    if bad:
        ap.error(f"replicate indices must lie in 0-199 (the SBC run's 200 replicates); got {bad}")
    main(args.reps)
