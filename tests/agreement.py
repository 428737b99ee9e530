"""Shared check: a twin's posterior for one patient agrees with a full refit that includes it."""

import arviz_stats as azs
import numpy as np


def assert_twin_matches_refit(ref, twin, patient: str, params) -> None:
    """|Δmean| <= 0.1 reference SD and SD ratio in [0.9, 1.1] for each of ``params``.

    The tolerance must exceed 3 Monte-Carlo SEs of the difference (reference MCSE from ArviZ; the
    twin's from the worst ESS in its gate, the resampled importance ESS for importance twins), so
    the check cannot pass merely because the draws were too few to see a difference.
    """
    ref_post = ref.posterior[list(params)].sel(patient=patient)
    twin_post = twin.posterior[list(params)].sel(patient=patient)
    ref_mcse = azs.mcse(ref_post, sample_dims=["chain", "draw"])
    row = twin.verdict.table.loc[patient]
    for name in params:
        r, t = ref_post[name], twin_post[name]
        sd = float(r.std())
        delta = abs(float(t.mean()) - float(r.mean())) / sd
        ratio = float(t.std()) / sd
        se = np.hypot(float(ref_mcse[name]), float(t.std()) / np.sqrt(float(row["ess_bulk"]))) / sd
        print(f"{row['method']} {patient} {name}: Δmean/SD={delta:.3f} (MC SE {se:.3f}), SD ratio={ratio:.3f}")
        assert 3 * se < 0.1, "too few draws for the tolerance to mean anything"
        assert delta <= 0.1
        assert 0.9 <= ratio <= 1.1
