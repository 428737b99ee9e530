"""Chunks spread over CPU devices give what one device gives (the test suite itself runs with one
device per xdist worker: tests/conftest.py)."""

import jax
import jax.numpy as jnp
import numpy as np

from bayestwin.engine.devices import local_devices, run_chunked


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
