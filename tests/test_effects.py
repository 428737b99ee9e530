"""Covariate effects on the user's scale (issue 21, item 3): per unit of a numeric column, and a
categorical level against its named reference; recovered from the simulated cohort's truth
(age: 3.0 per 10 years on the level; female: -0.3 on the slope)."""

import numpy as np
import pytest


def test_effects_are_per_unit_name_the_reference_and_recover_the_truth(population):
    eff = population.effects()
    assert set(eff.parameter) == {"beta_level", "beta_slope"}
    age = eff[(eff.parameter == "beta_level") & (eff.covariate == "age")].iloc[0]
    centre, scale = population.schema.numeric["age"]
    assert age.contrast == "per 1 unit of age" and age.reference == f"{centre:g} (cohort mean)"
    draws = population.posterior["beta_level"].sel(covariate="age").to_numpy().ravel() / scale
    assert age["mean"] == pytest.approx(draws.mean()) and age["sd"] == pytest.approx(draws.std(ddof=1))
    assert age["lower"] == pytest.approx(np.quantile(draws, 0.05))
    assert abs(age["mean"] - 0.3) < 3 * age["sd"], age
    sex = eff[(eff.parameter == "beta_slope") & (eff.covariate == "sex")].iloc[0]
    assert (sex.contrast, sex.reference) == ("M vs F", "F")
    assert abs(sex["mean"] - 0.3) < 3 * sex["sd"], sex  # M minus F: +0.3
    assert list(population.effects(prob=0.5).columns) == list(eff.columns)
    with pytest.raises(ValueError, match="prob must be between 0 and 1, not 90"):
        population.effects(prob=90)
