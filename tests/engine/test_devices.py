"""Twin chunks and population-fit chains spread over CPU devices give what one device gives (the
test suite itself runs with one device per xdist worker: tests/conftest.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pymc as pm
import pytest

from bayestwin.engine.devices import chain_groups, local_devices, run_chunked
from bayestwin.engine.fit import FitConfig, sample_model


@jax.jit
def _go(seeds, y, mask):
    noise = jax.vmap(lambda s: jax.random.normal(jax.random.key(s), (3,)))(seeds)
    return {"x": (y * mask).sum(axis=1, keepdims=True) + noise}


def _run(data, mask, seeds, device):
    return _go(*jax.device_put((jnp.asarray(seeds), jnp.asarray(data["y"]), jnp.asarray(mask)), device))


def test_results_do_not_depend_on_the_number_of_devices(monkeypatch):
    rng = np.random.default_rng(0)
    data = {"y": rng.normal(size=(11, 4))}
    mask = (rng.random((11, 4)) > 0.3).astype(float)
    seeds = np.arange(100, 111, dtype=np.uint32)
    out = {}
    for n in ("1", "2"):
        monkeypatch.setenv("BAYESTWIN_CPU_DEVICES", n)
        assert len(local_devices()) == min(int(n), len(jax.local_devices()))
        out[n] = run_chunked(_run, data, mask, seeds, chunk=4)["x"]
    assert out["1"].shape == (11, 3)
    np.testing.assert_array_equal(out["1"], out["2"])


def test_chains_split_into_equal_groups_one_per_device(monkeypatch):
    monkeypatch.setenv("BAYESTWIN_CPU_DEVICES", "1")
    assert [g.tolist() for _, g in chain_groups(4)] == [[0, 1, 2, 3]]
    monkeypatch.setenv("BAYESTWIN_CPU_DEVICES", "2")
    groups = chain_groups(4)
    assert [g.tolist() for _, g in groups] == [[0, 1], [2, 3]]
    assert groups[0][0] != groups[1][0]
    monkeypatch.setenv("BAYESTWIN_CPU_DEVICES", "3")  # equal groups only: 4 chains as 2 + 2
    assert [g.tolist() for _, g in chain_groups(4)] == [[0, 1], [2, 3]]
    assert [g.tolist() for _, g in chain_groups(3)] == [[0], [1], [2]]
    monkeypatch.setenv("BAYESTWIN_CPU_DEVICES", "2")
    assert [g.tolist() for _, g in chain_groups(5)] == [[0, 1, 2, 3, 4]]  # 5 chains do not split in two
    monkeypatch.setenv("BAYESTWIN_CPU_DEVICES", "two")
    message = r"^\$BAYESTWIN_CPU_DEVICES must be a whole number of CPU devices \(e.g. 1\), not 'two'$"
    with pytest.raises(ValueError, match=message):
        chain_groups(4)
    monkeypatch.setenv("BAYESTWIN_CPU_DEVICES", "0")
    with pytest.raises(ValueError, match=message.replace("'two'", "'0'")):
        chain_groups(4)


def _normal_model():
    y = np.random.default_rng(0).normal(3.0, 2.0, size=30)
    with pm.Model() as model:
        mu = pm.Normal("mu", 0.0, 10.0)
        sigma = pm.HalfNormal("sigma", 5.0)
        pm.Normal("y", mu, sigma, observed=y)
    return model


@pytest.mark.parametrize("split", ["shard", "threads"])
def test_a_fit_split_over_two_devices_runs_the_same_chains(monkeypatch, split):
    """Each chain keeps its key and start whichever device runs it: the first draws of a fit on
    two devices equal a one-device fit's to rounding (later ones drift apart as NUTS's trees
    amplify the last bits in which 2 vectorised chains differ from 4), and stalls, restarts
    and extensions still work per chain (tests/engine/test_stalls_and_extension.py runs them)."""
    cfg = FitConfig(draws=30, tune=60, chains=4, split=split)
    out = {}
    for n in ("1", "2"):
        monkeypatch.setenv("BAYESTWIN_CPU_DEVICES", n)
        idata = sample_model(_normal_model(), ["mu", "sigma"], cfg, seed=5)
        assert idata.posterior.attrs["devices"] == int(n)
        out[n] = idata.posterior["mu"].to_numpy()
    assert out["2"].shape == (4, 30)
    np.testing.assert_allclose(out["2"][:, :5], out["1"][:, :5], rtol=1e-6)
    assert len({float(c[0]) for c in out["2"]}) == 4  # four different chains, not one copied


def test_a_fit_with_a_progress_bar_on_two_devices_runs_threads_and_says_so(monkeypatch):
    """numpyro shows no bar for a sharded run, so a fit asked for one runs a thread per device."""
    monkeypatch.setenv("BAYESTWIN_CPU_DEVICES", "2")
    idata = sample_model(_normal_model(), ["mu", "sigma"], FitConfig(draws=30, tune=60), seed=5, progressbar=True)
    assert (idata.posterior.attrs["devices"], idata.posterior.attrs["split"]) == (2, "threads")
    monkeypatch.setenv("BAYESTWIN_CPU_DEVICES", "1")
    one = sample_model(_normal_model(), ["mu", "sigma"], FitConfig(draws=30, tune=60), seed=5)
    assert "split" not in one.posterior.attrs
    first = [d.posterior["mu"].to_numpy()[:, :5] for d in (idata, one)]
    np.testing.assert_allclose(first[0], first[1], rtol=1e-6)


def test_a_split_is_refused_unless_known():
    with pytest.raises(ValueError, match=r"split must be one of \('shard', 'threads'\), not 'pmap'"):
        FitConfig(split="pmap").check()


@pytest.mark.parametrize(
    "field, value", [("chains", 0), ("chains", "4"), ("chains", 2.5), ("chains", True), ("draws", 0), ("tune", -1)]
)
def test_chain_counts_that_cannot_run_are_refused_by_name(field, value):
    least = {"chains": 1, "draws": 1, "tune": 0}[field]
    with pytest.raises(ValueError, match=rf"^{field} must be a whole number >= {least}, not {value!r}$"):
        FitConfig(**{field: value}).check()
