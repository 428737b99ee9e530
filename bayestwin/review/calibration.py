"""Forecast calibration: do a twin's predictive intervals cover what happens next?

For patients the population has not seen, each patient's first ``visits`` visits (or those up
to a ``landmark`` time) are the twin's data and the later ones are held out. For every held-out
visit the twin's posterior predictive of a new measurement (under the therapy the patient was on) gives

* the probability integral transform, PIT = P(y_new <= y_observed), uniform on [0, 1] when the
  forecasts are calibrated (Dawid 1984; Gneiting, Balabdaoui & Raftery 2007);
* whether the central 50/80/90% predictive intervals cover the observed value.

Coverage is reported with its binomial standard error. Held-out visits of one patient share the
patient's posterior, so they are not independent: the SE is a guide, not a test.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from bayestwin.data.cohort import OUTCOME, PATIENT, THERAPY, TIME

LEVELS = (0.5, 0.8, 0.9)


@dataclass
class Calibration:
    """Held-out forecasts: one row per held-out visit (``table``) and coverage per level."""

    table: pd.DataFrame  # patient, time, therapy, observed, pred_mean, pred_sd, pit, converged, covered_50, ...
    levels: tuple[float, ...] = LEVELS
    cut: str = ""  # what the twins saw: "visits=3" or "landmark=2"
    skipped: int = 0  # patients with nothing before or nothing after the cut
    groups: int = 1  # forecast groups (memory bound)

    @property
    def coverage(self) -> pd.DataFrame:
        """Nominal vs observed coverage of the central predictive intervals, with binomial SEs."""
        n = len(self.table)
        rows = []
        for lv in self.levels:
            hit = self.table[_col(lv)].to_numpy(bool)
            p = float(hit.mean()) if n else np.nan
            rows.append({"nominal": lv, "observed": p, "n": n, "se": np.sqrt(lv * (1 - lv) / n) if n else np.nan})
        return pd.DataFrame(rows).set_index("nominal")

    def pit_histogram(self, bins: int = 10) -> pd.Series:
        """Counts of PIT values in ``bins`` equal bins on [0, 1] (flat when calibrated)."""
        counts, edges = np.histogram(self.table["pit"], bins=bins, range=(0.0, 1.0))
        edges = np.round(edges, 6)  # 0.3, not 0.30000000000000004
        return pd.Series(counts, index=pd.IntervalIndex.from_breaks(edges, closed="left"), name="count")

    @classmethod
    def combine(cls, parts: Sequence[Calibration]) -> Calibration:
        """Pool the held-out visits of several calibrations (e.g. the folds of a cross-validation)."""
        levels = parts[0].levels
        if any(p.levels != levels for p in parts):
            raise ValueError("calibrations to combine must share their interval levels")
        cuts = {p.cut for p in parts}
        return cls(
            pd.concat([p.table for p in parts], ignore_index=True),
            levels,
            cut=cuts.pop() if len(cuts) == 1 else "mixed",
            skipped=sum(p.skipped for p in parts),
            groups=sum(p.groups for p in parts),
        )

    def plot(self, axes=None):
        """PIT histogram (with the flat line and a 95% band for uniform counts) and a coverage plot."""
        import matplotlib.pyplot as plt

        if axes is None:
            _, axes = plt.subplots(1, 2, figsize=(9, 3.5))
        ax_pit, ax_cov = axes
        hist = self.pit_histogram()
        n, k = len(self.table), len(hist)
        expected = n / k
        band = 1.96 * np.sqrt(n * (1 / k) * (1 - 1 / k))
        ax_pit.bar([iv.left for iv in hist.index], hist.to_numpy(), width=1 / k, align="edge", color="C0", alpha=0.7)
        ax_pit.axhline(expected, color="k", lw=1)
        ax_pit.axhspan(expected - band, expected + band, color="k", alpha=0.1)
        ax_pit.set(xlabel="PIT of held-out visit", ylabel="count", title="PIT histogram")
        cov = self.coverage
        ax_cov.errorbar(cov.index, cov["observed"], yerr=1.96 * cov["se"], fmt="o", color="C1")
        ax_cov.plot([0, 1], [0, 1], "k--", lw=1)
        ax_cov.set(xlim=(0, 1), ylim=(0, 1), xlabel="nominal coverage", ylabel="observed", title="Interval coverage")
        return axes

    def __repr__(self) -> str:
        cov = ", ".join(f"{lv:.0%}: {p:.1%}" for lv, p in self.coverage["observed"].items())
        n, k = len(self.table), self.table["patient"].nunique()
        twins = ""
        if "converged" in self.table:
            bad = self.table.loc[~self.table["converged"].astype(bool), "patient"].nunique()
            twins = f"; {k - bad} of {k} twins converged" if bad else ""
        cut = f", {self.cut}" if self.cut else ""
        return f"Calibration({n} held-out visits of {k} patients{cut}; coverage {cov}{twins})"


def _col(level: float) -> str:
    return f"covered_{int(round(level * 100))}"


def forecast_calibration(
    population,
    rows: pd.DataFrame,
    *,
    key,
    visits: int | None = None,
    landmark: float | None = None,
    levels: Sequence[float] = LEVELS,
    method: str = "importance",
    seed: int = 0,
    memory: float | None = None,
) -> Calibration:
    """Condition each patient's twin on its early visits and score the forecasts of the rest.

    ``rows``: new patients (not in ``population``), in the fitting table's columns. What the twin
    sees is either each patient's first ``visits`` visits (default 3), or, with ``landmark``,
    every visit at a time up to ``landmark`` ("everything up to year 2"; the fitting table's time
    unit). Patients with nothing before the cut or nothing after it contribute nothing (the
    result's ``skipped`` counts them). Forecasts are of a new measurement (``observation``: the
    structural prediction plus residual error) under each held-out visit's own therapy, given
    from the last conditioning visit on (a switch between the two is dated there). Each row
    carries its twin's verdict (``converged``, ``out_of_population``): a forecast from a twin
    that failed its gate is not a forecast to trust.

    Memory is bounded: patients are forecast in groups whose draws (draws x patients x
    therapies x held-out times) fit in ``memory`` bytes (default a quarter of
    :func:`bayestwin._memory.budget`), each group at its own visit times only, so irregular
    schedules no longer multiply. For cross-validation, fit populations on folds of patients
    and :meth:`Calibration.combine` the results.

    Examples
    --------
    >>> cal = forecast_calibration(population, held_out_rows, key=KEY, visits=3)  # doctest: +SKIP
    >>> cal = forecast_calibration(population, held_out_rows, key=KEY, landmark=2.0)  # doctest: +SKIP
    >>> cal.coverage  # doctest: +SKIP
    """
    from bayestwin import _memory

    if visits is not None and landmark is not None:
        raise ValueError("give visits= or landmark=, not both: the twin sees the first visits or those up to a time")
    if landmark is None and visits is None:
        visits = 3
    if visits is not None and (isinstance(visits, bool) or not isinstance(visits, int | np.integer) or visits < 1):
        raise ValueError(f"visits must be a whole number of visits, 1 or more, not {visits!r}")
    if landmark is not None and not (isinstance(landmark, int | float | np.number) and np.isfinite(landmark)):
        raise ValueError(f"landmark must be a finite time, not {landmark!r}")
    cohort = population.cohort(rows, key=key)
    if OUTCOME not in cohort.frame:
        raise ValueError(
            f"forecast calibration needs a longitudinal outcome table; family {population.family.name!r} has none"
        )
    frame = cohort.frame.sort_values([PATIENT, TIME])
    seen = frame[TIME] <= landmark if landmark is not None else frame.groupby(PATIENT).cumcount() < visits
    early, late = frame[seen], frame[~seen]
    late = late[late[PATIENT].isin(early[PATIENT])]
    cut = f"landmark={landmark:g}" if landmark is not None else f"visits={visits}"
    if late.empty:
        raise ValueError(f"no patient has a visit before and after the cut ({cut}): nothing is held out")
    keep = late[PATIENT].unique()
    twin = population.condition(cohort.restrict(early[early[PATIENT].isin(keep)]), seed=seed, method=method)
    gate_of = twin.verdict.table

    # Groups of patients whose forecasts fit in memory, each at its own held-out times.
    n_draws = twin.posterior.sizes["chain"] * twin.posterior.sizes["draw"]
    limit = _memory.budget() / 4 if memory is None else float(memory)
    per_patient = late.groupby(PATIENT, sort=False).agg(n=(TIME, "size"), s=(THERAPY, "nunique"))
    groups, current, size = [], [], 0.0
    for patient, (n, k) in per_patient.iterrows():
        need = 2 * 8.0 * n_draws * int(n) * int(k)  # mean and observation, float64
        if current and size + need > limit:
            groups.append(current)
            current, size = [], 0.0
        current.append(patient)
        size += need
    groups.append(current)

    records = []
    for group in groups:
        rows_g = late[late[PATIENT].isin(group)]
        sub = twin.select(group) if len(groups) > 1 else twin
        therapies = list(dict.fromkeys(rows_g[THERAPY]))
        draws = sub.predict(therapies=therapies, times=np.sort(rows_g[TIME].unique())).draws["observation"]
        for (patient, therapy), grp in rows_g.groupby([PATIENT, THERAPY], sort=False):
            y = draws.sel(patient=patient, therapy=therapy, time=grp[TIME].to_numpy())
            y = y.stack(sample=("chain", "draw")).transpose("time", "sample").to_numpy()
            obs = grp[OUTCOME].to_numpy(float)
            rec = {
                "patient": patient,
                "time": grp[TIME].to_numpy(float),
                "therapy": therapy,
                "observed": obs,
                "pred_mean": y.mean(1),
                "pred_sd": y.std(1),
                "pit": (y <= obs[:, None]).mean(1),
                "converged": bool(gate_of.loc[patient, "converged"]),
                "out_of_population": bool(gate_of.loc[patient, "out_of_population"]),
            }
            for lv in levels:
                lo, hi = np.quantile(y, [(1 - lv) / 2, (1 + lv) / 2], axis=1)
                rec[_col(lv)] = (lo <= obs) & (obs <= hi)
            records.append(pd.DataFrame(rec))
    table = pd.concat(records, ignore_index=True).sort_values(["patient", "time"], ignore_index=True)
    skipped = int(frame[PATIENT].nunique() - len(keep))
    return Calibration(table, tuple(levels), cut=cut, skipped=skipped, groups=len(groups))
