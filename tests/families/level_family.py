"""The example family of ``bayestwin/families/base.py``'s docstring, as a module of its own:
a user's family outside bayestwin, registered, fitted, saved and loaded by import path."""

import jax
import numpy as np
import pymc as pm

from bayestwin.families.base import Axis, Design, FamilyBase, register_family


@register_family
class Level(FamilyBase):
    name = "level"
    inputs = {"patient_idx": Axis("obs"), "time": Axis("obs"), "y_obs": Axis("obs")}
    patient_vars, patient_outputs, residual_params = ("z",), ("patient_level",), ("sigma",)

    def design(self, frame, baseline, schema):
        patients = list(baseline.index)
        idx = frame["patient"].map({p: i for i, p in enumerate(patients)}).to_numpy(np.int64)
        return Design(
            patients,
            {"patient_idx": idx, "time": frame["time"].to_numpy(float), "y_obs": frame["outcome"].to_numpy(float)},
        )

    def template_design(self, schema, n_obs):
        return Design(
            ["twin"], {"patient_idx": np.zeros(n_obs, np.int64), "time": np.zeros(n_obs), "y_obs": np.zeros(n_obs)}
        )

    def build_model(self, design, schema):
        d = design.data
        with pm.Model(coords={"patient": design.patients, "obs": np.arange(len(d["y_obs"]))}) as m:
            idx = pm.Data("patient_idx", d["patient_idx"], dims="obs")
            pm.Data("time", d["time"], dims="obs")
            y = pm.Data("y_obs", d["y_obs"], dims="obs")
            level = pm.Normal("level", schema.outcome_mean, 10 * schema.outcome_sd)
            tau, sigma = pm.HalfNormal("tau", schema.outcome_sd), pm.HalfNormal("sigma", schema.outcome_sd)
            z = pm.Normal("z", 0, 1, dims="patient")
            a = pm.Deterministic("patient_level", level + tau * z, dims="patient")
            mu = pm.Deterministic("mu", a[idx], dims="obs")
            pm.Normal("y", mu, sigma, observed=y, dims="obs")
        return m

    def forecast_inputs(self, table, schema, therapies=None, times=None, start=None):
        times = np.asarray(times if times is not None else [0.0, schema.time_scale], float)
        B = len(table.patients)
        return ["as is"], times, {"time": np.broadcast_to(times, (B, 1, len(times)))}

    def scenario_arrays(self, scenarios, times, schema, start=0.0, before=None):
        return ["as is"], {"time": np.asarray(times, float)[None]}

    def observe(self, key, mu, params):
        return mu + params["sigma"] * jax.random.normal(key, mu.shape)
