"""Every notebook in notebooks/ executes top to bottom without error (nbclient).

The notebooks are split over two test files (this one and ``test_notebooks_b.py``) so that the
two pytest-xdist workers, which take whole files (``--dist loadfile``), share them.
"""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))
#: Run by this file; every other notebook by test_notebooks_b.py (so a new one is never skipped).
HERE = ("01_quickstart.ipynb", "04_review.ipynb", "05_from_fhir.ipynb", "07_your_model.ipynb")


#: Smaller sizes for the test run, injected after each notebook's cell tagged "parameters" (as
#: papermill does): the notebook runs top to bottom on the same code, in less time; its saved
#: outputs come from the full sizes.
CI_PARAMETERS = {
    "01_quickstart.ipynb": {"DRAWS": 400, "MANY": 12},
    "02_precision_dosing.ipynb": {"DRAWS": 400},
    "03_virtual_trial.ipynb": {"TRIALS": 400, "CURVE_TRIALS": 200, "POOL": 200, "FIT_DRAWS": 400},
    "04_review.ipynb": {"FOLD_DRAWS": 250, "DRAWS": 400},
    "06_event_risk.ipynb": {"DRAWS": 300, "CALIBRATION_DRAWS": 200, "JOINT_PATIENTS": 40, "JOINT_DRAWS": 300},
    "07_your_model.ipynb": {"DRAWS": 300},
    "08_pkpd_toxicity.ipynb": {"TWIN_CHAINS": 2, "TWIN_DRAWS": 50, "TWIN_TUNE": 100},
    "09_across_sites.ipynb": {
        "DRAWS": 400,
        "SWEEPS": 1,
        "REGISTRY": 120,
        "GROUPS": 3,
        "GROUP_DRAWS": 200,
        "RELEASES": 1,
        "TRIALS": 100,
    },
}


def run_notebook(path: Path, tmp_path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    overrides = CI_PARAMETERS.get(path.name)
    if overrides:
        at = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
        assert at, f"{path.name} has no cell tagged 'parameters'"
        source = "\n".join(f"{k} = {v!r}" for k, v in overrides.items())
        nb.cells.insert(at[0] + 1, nbformat.v4.new_code_cell(source))
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors


def test_there_are_notebooks():
    assert NOTEBOOKS, "no notebooks found"
    assert set(HERE) <= {p.name for p in NOTEBOOKS}, "a notebook named in HERE is missing"


@pytest.mark.slow
@pytest.mark.parametrize("path", [p for p in NOTEBOOKS if p.name in HERE], ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path):
    run_notebook(path, tmp_path)
