"""The notebooks that ``test_notebooks.py`` does not run (see its docstring)."""

import pytest

from tests.test_notebooks import HERE, NOTEBOOKS, run_notebook


@pytest.mark.slow
@pytest.mark.parametrize("path", [p for p in NOTEBOOKS if p.name not in HERE], ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path):
    run_notebook(path, tmp_path)
