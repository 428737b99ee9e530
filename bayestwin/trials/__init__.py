"""Virtual cohorts and in-silico trials from a fitted population model.

- :func:`virtual_cohort`: virtual patients under every therapy (xarray, replicate x patient x therapy x time);
- :class:`TrialDesign`, :func:`simulate_trials`, :func:`operating_characteristics`,
  :func:`sample_size`: two-arm trials, their power, type-I error and assurance;
- :func:`procova`: prognostic-twin covariate adjustment (PROCOVA) and its sample-size saving;
- :func:`adaptive_dosing_trial`: precision dosing by twins vs fixed dosing;
- :func:`toxicity_dosing_trial`: PK/PD twins choosing doses by exposure and toxicity vs BSA dosing.
"""

from bayestwin.trials.adaptive import AdaptiveResult, adaptive_dosing_trial
from bayestwin.trials.design import TrialDesign, read_design
from bayestwin.trials.procova import ProcovaResult, procova
from bayestwin.trials.simulate import operating_characteristics, power, sample_size, simulate_trials
from bayestwin.trials.toxicity import ToxicityResult, toxicity_dosing_trial
from bayestwin.trials.virtual import draw_covariates, population_draws, virtual_cohort

__all__ = [
    "AdaptiveResult",
    "ProcovaResult",
    "adaptive_dosing_trial",
    "TrialDesign",
    "draw_covariates",
    "operating_characteristics",
    "population_draws",
    "power",
    "procova",
    "read_design",
    "sample_size",
    "simulate_trials",
    "ToxicityResult",
    "toxicity_dosing_trial",
    "virtual_cohort",
]
