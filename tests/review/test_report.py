"""The reviewer report: one self-contained HTML file that renders offline in headless Chromium."""

import re
import shutil
import subprocess

import numpy as np
import pytest

from bayestwin.cli import main
from bayestwin.io import data_fingerprint as _fingerprint
from bayestwin.review import review
from tests.conftest import KEY

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def assert_self_contained(text: str) -> None:
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    assert not re.search(r"""(src|href)\s*=\s*['"](?!data:)""", text), "an external resource"
    assert "<script" not in text


@pytest.fixture(scope="module")
def population_report(population, tmp_path_factory):
    import pandas as pd

    from bayestwin.review.calibration import Calibration

    cal = Calibration(
        pd.DataFrame(
            {
                "patient": ["a", "b"],
                "time": [1.0, 2.0],
                "therapy": ["x", "x"],
                "observed": [1.0, 2.0],
                "pred_mean": [1.0, 2.0],
                "pred_sd": [1.0, 1.0],
                "pit": [0.3, 0.6],
                "covered_50": [True, True],
                "covered_80": [True, True],
                "covered_90": [True, True],
            }
        )
    )
    return review(population, tmp_path_factory.mktemp("report") / "fit.html", calibration=cal)


def test_population_report_is_complete_and_self_contained(population, population_report):
    text = population_report.read_text()
    assert_self_contained(text)
    for section in (
        "Verdict:",
        "Model card",
        "Posterior summary",
        "Convergence diagnostics per variable",
        "Rank plots",
        "Energy",
        "Posterior predictive check",
        "PSIS-LOO and Pareto k̂",
        "leave one patient out",
        "Forecast calibration",
        "Patient effects",
        "The model and its priors",
    ):
        assert section in text, section
    assert str(population.verdict) in text
    assert _fingerprint(population.idata) in text
    assert "numpyro" in text and "pymc" in text
    assert text.count("src='data:image/png;base64,") >= 6
    draws = population.posterior.sizes["chain"] * population.posterior.sizes["draw"]
    assert f"With S = {draws} draws" in text and "influential" not in text  # the PSIS paper's wording
    assert "re_chol_corr[1, 0]" not in text  # the repeated triangle of the correlation matrix


def test_twin_report(population, simulated, tmp_path):
    _, held, _ = simulated
    twin = population.condition(held, key=KEY, seed=2, method="importance")
    text = review(twin, tmp_path / "twin.html").read_text()
    assert_self_contained(text)
    for section in (
        "Per-twin diagnostics",
        "out_of_population",
        "Prior (population predictive) vs posterior",
        "Forecast bands",
    ):
        assert section in text, section
    assert text.count("src='data:image/png;base64,") == 1 + 3  # prior-vs-posterior + 3 forecasts


def test_review_cli_on_a_saved_fit(population, tmp_path, capsys):
    path = tmp_path / "fit.nc"
    population.idata.to_netcdf(path)
    assert main(["review", str(path)]) == 0
    html = path.with_suffix(".html")
    assert capsys.readouterr().out.strip() == f"wrote {html}"
    text = html.read_text()
    assert_self_contained(text)
    assert "Rank plots" in text and "PSIS-LOO" in text and str(population.verdict).split(" (")[0] in text
    assert f"Verdict stored with the fit: {population.verdict}" in text  # the verdict travels in the file
    assert main(["review", str(tmp_path / "missing.nc")]) == 1
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "junk.nc").write_text("not netcdf")
    assert main(["review", str(tmp_path / "junk.nc")]) == 1
    assert "is not an ArviZ DataTree in netCDF" in capsys.readouterr().err


def test_review_rejects_other_objects(tmp_path):
    with pytest.raises(TypeError, match="review\\(\\) takes a Population, a Twin or an ArviZ DataTree, not dict"):
        review({}, tmp_path / "x.html")
    assert not (tmp_path / "x.html").exists()


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (.ci/run installs it)")
def test_report_renders_in_headless_chromium(population_report, tmp_path):
    from matplotlib.image import imread

    shot = tmp_path / "shot.png"
    cmd = [
        CHROMIUM,
        *FLAGS,
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={shot}",
        "--window-size=1200,3000",
        population_report.resolve().as_uri(),
    ]
    subprocess.run(cmd, check=True, timeout=120, capture_output=True)
    assert shot.stat().st_size > 20_000
    img = imread(shot)
    assert img.shape[0] == 3000 and img.shape[1] == 1200
    # not a blank page: text, tables and plots give many distinct shades
    assert len(np.unique((img[..., :3] * 255).astype(int).reshape(-1, 3), axis=0)) > 50
