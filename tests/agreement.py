"""Shared check: a twin's posterior for one patient agrees with a full refit that includes it."""

import arviz_stats as azs
import numpy as np


def assert_twin_matches_refit(ref, twin, patient: str, params) -> None:
    """|Δmean| <= 0.1 reference SD and SD ratio in [0.9, 1.1] for each of ``params``.

    ``params``: names, or (name, {dim: label}) for one element of a vector variable.
    The tolerance must exceed 3 Monte-Carlo SEs of the difference (reference MCSE from ArviZ; the
    twin's from the worst ESS in its gate, the resampled importance ESS for importance twins), so
    the check cannot pass merely because the draws were too few to see a difference.
    """
    row = twin.verdict.table.loc[patient]
    for p in params:
        name, where = (p, {}) if isinstance(p, str) else p
        r = ref.posterior[name].sel(patient=patient, **where)
        t = twin.posterior[name].sel(patient=patient, **where)
        ref_mcse = float(azs.mcse(r, sample_dims=["chain", "draw"]))
        sd = float(r.std())
        delta = abs(float(t.mean()) - float(r.mean())) / sd
        ratio = float(t.std()) / sd
        se = np.hypot(ref_mcse, float(t.std()) / np.sqrt(float(row["ess_bulk"]))) / sd
        label = name + "".join(f"[{v}]" for v in where.values())
        print(f"{row['method']} {patient} {label}: Δmean/SD={delta:.3f} (MC SE {se:.3f}), SD ratio={ratio:.3f}")
        assert 3 * se < 0.1, "too few draws for the tolerance to mean anything"
        assert delta <= 0.1
        assert 0.9 <= ratio <= 1.1
