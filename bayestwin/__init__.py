"""bayestwin: patient digital twins from hierarchical Bayesian population models.

Cohort -> fit -> Population -> condition -> Twin -> predict -> Forecast.
"""

import os as _os
import warnings as _warnings

import jax as _jax


def _keep_xla_flags() -> None:
    """Move a host device count to the end of ``$XLA_FLAGS``, before PyMC's JAX module reads it.

    PyMC's JAX module, imported below, rewrites ``$XLA_FLAGS`` at import: it drops a device
    count with a greedy pattern (``--xla_force_host_platform_device_count=.+\\s``) that drops
    every flag after it too, then asks for 100 host devices. A process started from a process
    that imported it inherits the count first, so its other XLA flags were lost (found when a
    Flower site's ClientApp, started by its SuperNode, compiled at XLA's default level instead
    of its parent's and sampled other chains). Last in the string, the count is kept whole.
    """
    flags = _os.environ.get("XLA_FLAGS", "").split()
    count = [f for f in flags if f.startswith("--xla_force_host_platform_device_count=")]
    if count and flags[-len(count) :] != count:
        _os.environ["XLA_FLAGS"] = " ".join([*(f for f in flags if f not in count), *count])


_keep_xla_flags()

_jax.config.update("jax_enable_x64", True)
from bayestwin import cache as _cache  # noqa: E402

_cache.enable()  # compiled programs kept on disk between sessions (see bayestwin.cache)
# pytensor warns at import when it finds no optimised BLAS; we compile to JAX, not C.
_warnings.filterwarnings("ignore", message=".*BLAS.*", module="pytensor")

from bayestwin.data import PSEUDONYMISED, Cohort, Schema, new_key, pseudonymise, reidentify  # noqa: E402
from bayestwin.data.fhir import Measure, read_fhir  # noqa: E402
from bayestwin.data.joint import read_joint  # noqa: E402
from bayestwin.data.nonmem import Events, read_nonmem  # noqa: E402
from bayestwin.data.survival import read_survival  # noqa: E402
from bayestwin.dosing import Outcome, Regimen, dose_search, outcome_search  # noqa: E402
from bayestwin.errors import ConvergenceWarning, DataError, OutOfPopulationWarning  # noqa: E402
from bayestwin.families import (  # noqa: E402
    Formula,
    Joint,
    Model,
    Ode,
    OdeModel,
    Pk,
    Prior,
    Progression,
    Survival,
    register_family,
)
from bayestwin.families.pk_covariates import Categorical, Exponential, Linear, Power  # noqa: E402
from bayestwin.forecast import EventForecast, Forecast  # noqa: E402
from bayestwin.io import ArtifactError, save  # noqa: E402
from bayestwin.population import Population, fit  # noqa: E402
from bayestwin.privacy import DP, private_fit  # noqa: E402
from bayestwin.settings import options  # noqa: E402
from bayestwin.twin import Twin  # noqa: E402
from bayestwin.zoo import load_any as load  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "Categorical",
    "Exponential",
    "Linear",
    "Power",
    "Formula",
    "Model",
    "register_family",
    "PSEUDONYMISED",
    "Measure",
    "read_fhir",
    "ArtifactError",
    "Cohort",
    "ConvergenceWarning",
    "OutOfPopulationWarning",
    "DataError",
    "Events",
    "EventForecast",
    "Forecast",
    "Ode",
    "OdeModel",
    "Pk",
    "Population",
    "Prior",
    "Progression",
    "Survival",
    "read_survival",
    "Joint",
    "read_joint",
    "Regimen",
    "Schema",
    "DP",
    "private_fit",
    "Twin",
    "dose_search",
    "outcome_search",
    "Outcome",
    "fit",
    "load",
    "new_key",
    "options",
    "pseudonymise",
    "read_nonmem",
    "reidentify",
    "save",
]
