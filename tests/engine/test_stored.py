"""Traced programs stored on disk (bayestwin.engine.stored): keyed by what they compute, read back
only when their checksum holds, never for a family whose code lies outside the package."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bayestwin as bt
from bayestwin.data.cohort import Schema
from bayestwin.engine import stored


@pytest.fixture
def folder(tmp_path, monkeypatch):
    where = tmp_path / "traced"
    monkeypatch.setattr(stored, "folder", lambda: where)
    return where


def _counted():
    """A jitted function and the number of times JAX has traced it."""
    traced = []

    @jax.jit
    def go(a, b):
        traced.append(1)
        return {"sum": a + 2.0 * b, "norm": jnp.sqrt((a**2).sum())}

    return go, traced


def test_a_second_process_reads_the_program_instead_of_tracing_it(folder):
    go, traced = _counted()
    a, b = np.arange(3.0), np.ones(3)
    first = stored.Stored(go, "identity-1", "settings")(a, b)
    assert len(traced) == 1 and len(list(folder.glob("*.jaxexport"))) == 1
    # a new Stored (as in a new process) with the same identity, settings and shapes: no trace
    again, traced_again = _counted()
    out = stored.Stored(again, "identity-1", "settings")(a, b)
    assert traced_again == [] and jax.tree.all(jax.tree.map(np.array_equal, out, first))
    # other shapes, settings or identity: exported and stored anew (JAX may reuse its own trace)
    stored.Stored(again, "identity-1", "settings")(np.arange(4.0), np.ones(4))
    stored.Stored(again, "identity-1", "other settings")(a, b)
    stored.Stored(again, "identity-2", "settings")(a, b)
    assert traced_again and len(list(folder.glob("*.jaxexport"))) == 4


def test_a_damaged_or_foreign_file_is_traced_again_and_rewritten(folder):
    go, _ = _counted()
    a, b = np.arange(3.0), np.ones(3)
    want = stored.Stored(go, "id", "s")(a, b)
    [path] = folder.glob("*.jaxexport")
    good = path.read_bytes()
    for damaged in (good[:-10], good[:-1] + bytes([good[-1] ^ 1]), b"not a program", b""):
        path.write_bytes(damaged)
        assert stored.read(path) is None
        again, traced = _counted()
        out = stored.Stored(again, "id", "s")(a, b)
        assert traced == [1] and jax.tree.all(jax.tree.map(np.array_equal, out, want))
        assert stored.read(path) is not None  # rewritten whole


def test_without_an_identity_or_a_cache_the_function_runs_as_it_is(folder, monkeypatch):
    go, traced = _counted()
    stored.Stored(go, None, "s")(np.arange(3.0), np.ones(3))
    assert traced == [1] and not folder.exists()
    monkeypatch.setattr(stored, "folder", lambda: None)
    stored.Stored(go, "id", "s")(np.arange(5.0), np.ones(5))
    assert traced == [1, 1] and not folder.exists()


def test_a_program_jax_cannot_export_runs_as_it_is(folder):
    seen = []

    @jax.jit
    def go(a):  # a host callback, as diffrax's step checks make: jax.export refuses it
        jax.debug.callback(lambda v: seen.append(float(v)), a.sum())
        return a * 2.0

    out = stored.Stored(go, "with-callback", "s")(np.arange(3.0))
    assert np.array_equal(out, np.arange(3.0) * 2.0) and seen == [3.0]
    assert not folder.exists() or not list(folder.glob("*.jaxexport"))


def test_an_unwritable_folder_costs_a_warning_not_the_result(tmp_path, monkeypatch):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    monkeypatch.setattr(stored, "folder", lambda: blocked / "traced")
    go, _ = _counted()
    with pytest.warns(RuntimeWarning, match="traced twin programs cannot be stored in .*a-file/traced"):
        out = stored.Stored(go, "id-unwritable", "s")(np.arange(3.0), np.ones(3))
    assert np.array_equal(out["sum"], np.arange(3.0) + 2.0)


def test_the_folder_is_trimmed_to_its_bound_oldest_first(folder):
    folder.mkdir()
    for i in range(5):
        (folder / f"{i}.jaxexport").write_bytes(b"x" * 100)
        os.utime(folder / f"{i}.jaxexport", (1000 + i, 1000 + i))
    assert stored.trim(folder, limit=250) == 3
    assert sorted(p.name for p in folder.iterdir()) == ["3.jaxexport", "4.jaxexport"]


def test_identity_follows_the_family_schema_and_shapes_and_refuses_outside_code():
    schema = Schema(therapies=["standard", "drug"], numeric={"age": (50.0, 10.0)}, categorical={})
    base = stored.program_identity(bt.Progression(), schema, 8, {})
    assert isinstance(base, str) and base == stored.program_identity(bt.Progression(), schema, 8, {})
    others = [
        stored.program_identity(bt.Progression(residual="student"), schema, 8, {}),
        stored.program_identity(bt.Progression(), schema, 16, {}),
        stored.program_identity(bt.Pk(), schema, 8, {"dose": 4}),
        stored.program_identity(
            bt.Progression(),
            Schema(therapies=["standard", "drug"], numeric={"age": (51.0, 10.0)}, categorical={}),
            8,
            {},
        ),
    ]
    assert len({base, *others}) == 5

    class Mine(bt.Progression):  # a user's family: its code is not the package's
        pass

    assert stored.program_identity(Mine(), schema, 8, {}) is None
    opaque = bt.Progression()
    opaque.config = lambda: {"family": "progression", "priors": {"sigma": object()}}  # a repr hides its content
    assert stored.program_identity(opaque, schema, 8, {}) is None
    numpy_valued = bt.Progression()
    numpy_valued.config = lambda: {"family": "progression", "pieces": np.int64(3), "cuts": np.array([1.0, 2.0])}
    assert stored.program_identity(numpy_valued, schema, 8, {}) is not None
    assert stored._names_outside_code({"build": "__main__:build", "priors": {}})
    assert stored._names_outside_code({"model": "object:Friberg"})
    assert not stored._names_outside_code({"model": "friberg", "build": "bayestwin.zoo:x", "x": [1.0, "WT"]})


CONCURRENT = """
import sys, numpy as np, jax, jax.numpy as jnp
from pathlib import Path
from bayestwin.engine import stored
stored.folder = lambda: Path(sys.argv[1])
go = jax.jit(lambda a: {"y": jnp.cumsum(a) * 3.0})
for _ in range(20):  # the same key, written and read by both processes at once
    out = stored.Stored(go, "shared", "s")(np.arange(6.0))
    assert np.array_equal(out["y"], np.cumsum(np.arange(6.0)) * 3.0)
print("OK")
"""


def test_processes_sharing_the_folder_never_read_a_partial_program(tmp_path):
    import subprocess
    import sys

    where = tmp_path / "traced"
    runs = [
        subprocess.Popen([sys.executable, "-c", CONCURRENT, str(where)], stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    assert [r.communicate(timeout=300)[0].strip() for r in runs] == ["OK"] * 3
    files = list(where.iterdir())
    assert len(files) == 1 and stored.read(files[0]) is not None  # one program, whole; no temporary left
