"""The documentation site builds in strict mode (a warning or a broken link fails it) and its
pages render in headless Chromium (issue 21, item 6)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.review.test_report import CHROMIUM, FLAGS

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "docs" / "mkdocs.yml"), "-d", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    return out


def test_every_page_is_built(site):
    pages = [
        "index.html",
        "api/index.html",
        *(
            f"guides/{g}/index.html"
            for g in ("biostatistician", "pharmacometrician", "trial-designer", "reviewer", "architecture")
        ),
    ]
    pages += [f"notebooks/{nb.stem}/index.html" for nb in sorted((ROOT / "notebooks").glob("*.ipynb"))]
    missing = [p for p in pages if not (site / p).is_file()]
    assert not missing, missing
    api = (site / "api" / "index.html").read_text()
    for name in (
        "bayestwin.population.Population",
        "bayestwin.twin.Twin",
        "bayestwin.dosing.dose_search",
        "bayestwin.settings.options",
        "bayestwin.review.convergence.free_quantities",
    ):
        assert f'id="{name}"' in api, name
    quick = (site / "notebooks" / "01_quickstart" / "index.html").read_text()
    assert "data:image/png;base64" in quick  # the stored outputs, plots included, are rendered


def test_readme_is_short_and_points_to_the_site():
    text = (ROOT / "README.md").read_text()
    assert len(text.encode()) < 10_000
    assert "docs/mkdocs.yml" in text


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (.ci/run installs it)")
@pytest.mark.parametrize("page", ["guides/pharmacometrician/index.html", "api/index.html"])
def test_pages_render_in_headless_chromium(site, page, tmp_path):
    from matplotlib.image import imread

    shot = tmp_path / "shot.png"
    cmd = [
        CHROMIUM,
        *FLAGS,
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={shot}",
        "--window-size=1280,2000",
        (site / page).as_uri(),
    ]
    subprocess.run(cmd, check=True, timeout=120, capture_output=True)
    img = imread(shot)
    assert img.shape[:2] == (2000, 1280)
    # text, navigation and code blocks: many distinct shades, not a blank or unstyled page
    assert len(np.unique((img[..., :3] * 255).astype(int).reshape(-1, 3), axis=0)) > 50
    assert shutil.which(CHROMIUM)


def _undocumented() -> list[str]:
    import inspect

    import bayestwin as bt
    import bayestwin.federated as federated
    import bayestwin.review as review
    import bayestwin.trials as trials

    missing = []
    modules = (
        (bt, "bt"),
        (review, "bayestwin.review"),
        (trials, "bayestwin.trials"),
        (federated, "bayestwin.federated"),
    )
    for module, prefix in modules:
        for name in module.__all__:
            obj = getattr(module, name)
            if not inspect.getdoc(obj):
                missing.append(f"{prefix}.{name}")
            if not inspect.isclass(obj):
                continue
            for member, value in vars(obj).items():
                if member.startswith("_"):
                    continue
                if isinstance(value, property):
                    docs = [vars(c)[member].__doc__ for c in obj.__mro__ if member in vars(c)]
                    documented = any((d or "").strip() for d in docs)  # an override keeps its base's words
                elif isinstance(value, classmethod | staticmethod) or inspect.isfunction(value):
                    documented = bool(inspect.getdoc(getattr(obj, member)))
                else:
                    continue
                if not documented:
                    missing.append(f"{prefix}.{name}.{member}")
    return missing


def test_every_public_name_and_member_has_a_docstring():
    assert _undocumented() == []
