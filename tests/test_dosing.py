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


def test_regimen_validation():
    with pytest.raises(ValueError, match="infusion longer than the dosing interval"):
        Regimen(100.0, 8.0, duration=9.0)
    with pytest.raises(ValueError, match="a regimen needs amount > 0"):
        Regimen(0.0, 8.0)
