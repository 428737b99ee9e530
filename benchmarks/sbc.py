"""Full simulation-based calibration run (issue 4): >= 200 replicates per step. One command:

    .venv/bin/python benchmarks/sbc.py                  # 200 fit replicates, 1,000 virtual twins
    .venv/bin/python benchmarks/sbc.py --reps 20        # a shorter run
    .venv/bin/python benchmarks/sbc.py --family pk      # one family (default: progression, then pk)
    .venv/bin/python benchmarks/sbc.py --family pk --seed 1   # an independent run (design, data, fits)

Writes the rank histograms (sbc_fit.png, sbc_twins.png) and the table (sbc.csv) per family into
benchmarks/results/sbc/FAMILY/ (sbc-seedN/FAMILY/ with --seed N) and prints the table with the
wall time. A stopped run resumes from sbc_fit_partial.csv there. Only an earlier SBC run's files
are replaced (plots are recognised by their PNG title, which plots written before 3 December
2026 lack: --force replaces those, or any file of the outputs' names). The same code as
``bayestwin validate sbc`` (:func:`bayestwin.review.sbc.run_sbc`).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bayestwin.review.sbc import run_sbc

#: Draws and tuning steps per chain of each fit: PK fits of 12 subjects under the frozen priors
#: need 1,000 + 1,000 for R-hat and ESS (at 300 + 300, 10 of the first 10 failed the gate).
DRAWS = {"progression": 500, "pk": 1000}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--twins", type=int, default=1000)
    ap.add_argument("--family", choices=["progression", "pk"], action="append")
    ap.add_argument(
        "--draws", type=int, default=None, help="draws (and tuning steps) per chain of each fit (500; pk 1000)"
    )
    ap.add_argument("--seed", type=int, default=0, help="seed of the design, the replicates and the fits (0)")
    ap.add_argument("--out", default=None, help="folder of the results (benchmarks/results/sbc, or sbc-seedN)")
    ap.add_argument("--force", action="store_true", help="replace files in the folder that no SBC run wrote")
    args = ap.parse_args()
    out = Path(args.out or Path(__file__).parent / "results" / ("sbc" + (f"-seed{args.seed}" if args.seed else "")))
    for family in args.family or ["progression", "pk"]:
        t0 = time.perf_counter()
        draws = args.draws or DRAWS[family]
        res = run_sbc(
            family,
            reps=args.reps,
            twins=args.twins,
            out=out / family,
            draws=draws,
            seed=args.seed,
            overwrite=args.force,
        )
        print(
            f"\n{family}: wall {time.perf_counter() - t0:.0f} s; smallest p-value "
            f"{min(float(r.table['p_value'].min()) for r in res.values()):.4f}\n",
            flush=True,
        )


if __name__ == "__main__":
    main()
