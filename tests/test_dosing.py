"""Dose search: regimen concentrations equal the closed forms, and the table's logic."""

import numpy as np
import pandas as pd
import pytest

from bayestwin.dosing import Regimen, evaluate_regimens
from bayestwin.families import pk_analytic as pka
from bayestwin.families.pk import Pk


def test_regimen_metrics_equal_direct_superposition():
    fam = Pk()
    theta = {"cl": np.array([2.0, 3.0]), "v": np.array([30.0, 40.0]), "ka": np.array([1.0, 1.5])}
    history = pd.DataFrame({"TIME": [0.0], "AMT": [200.0], "DURATION": [0.0]})
    regimens = [Regimen(100.0, 12.0, doses=3), Regimen(150.0, 8.0, doses=4, duration=1.0)]
    got = evaluate_regimens(fam, theta, regimens, start=6.0, history=history, grid=25)
    for i, r in enumerate(regimens):
        new = 6.0 + r.interval * np.arange(r.doses)
        t = new[-1] + np.linspace(0.0, r.interval, 25)
        for s in range(2):
            cl, v, ka = theta["cl"][s], theta["v"][s], theta["ka"][s]
            c = pka.one_cmt_oral(np, t[:, None], np.array([0.0]), 200.0, cl, v, ka).sum(1)
            if r.duration > 0:
                c = c + pka.one_cmt_infusion(np, t[:, None], new, r.amount, r.duration, cl, v).sum(1)
            else:
                c = c + pka.one_cmt_oral(np, t[:, None], new, r.amount, cl, v, ka).sum(1)
            np.testing.assert_allclose(got["trough"][i, s], c[-1], rtol=1e-12)
            np.testing.assert_allclose(got["peak"][i, s], c.max(), rtol=1e-12)
            np.testing.assert_allclose(got["auc"][i, s], np.trapezoid(c, t), rtol=1e-12)


def test_amounts_on_one_schedule_share_one_evaluation_and_equal_each_alone(monkeypatch):
    """Regimens are grouped by schedule (history + amount x unit doses); interleaved schedules,
    per-patient histories (one at steady state) and chunks of regimens smaller than the list
    give what each regimen evaluated alone gives."""
    from bayestwin import _memory

    fam = Pk(compartments=2)
    rng = np.random.default_rng(0)
    ref = {"cl": 3.0, "v1": 30.0, "ka": 1.0, "q": 2.0, "v2": 40.0}
    theta = {k: m * np.exp(0.3 * rng.standard_normal((3, 20))) for k, m in ref.items()}
    regimens = [
        Regimen(a, i, doses=d, duration=u) for a in (300, 50) for i, d, u in ((12, 6, 0), (24, 3, 1), (8, 4, 0))
    ]
    history = [
        pd.DataFrame({"TIME": [0.0, 12.0], "AMT": [100.0, 200.0], "DURATION": [0.0, 2.0]}),
        None,
        pd.DataFrame({"TIME": [0.0], "AMT": [50.0], "DURATION": [0.0], "SS_II": [12.0]}),
    ]
    start = np.array([24.0, 0.0, 12.0])
    alone = [evaluate_regimens(fam, theta, [r], start=start, history=history) for r in regimens]
    monkeypatch.setattr(_memory, "budget", lambda: 4 * 4 * 3 * 20 * 25 * 8 * 8)  # chunks of 4 regimens
    together = evaluate_regimens(fam, theta, regimens, start=start, history=history)
    for i, one in enumerate(alone):
        for k in ("trough", "peak", "auc"):
            np.testing.assert_allclose(together[k][:, i], one[k][:, 0], rtol=1e-12)


def test_regimen_validation():
    with pytest.raises(ValueError, match="infusion longer than the dosing interval"):
        Regimen(100.0, 8.0, duration=9.0)
    with pytest.raises(ValueError, match="a regimen needs amount > 0"):
        Regimen(0.0, 8.0)
