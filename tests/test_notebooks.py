"""The notebooks run top to bottom on the synthetic source, and are committed without outputs.

Each notebook is executed in a fresh ``python3`` kernel with nbclient. jupyter_client starts a
kernelspec whose command is ``python`` with ``sys.executable``, so the kernel runs in the same
environment as pytest (the project's ``.venv``) without installing a kernelspec. The kernel
inherits ``os.environ``, which is how ``NOWCAST_NOTEBOOK_WORKDIR`` sends its outputs to
``tmp_path``.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pandas as pd
import pytest
import xarray as xr
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOK_NAMES = ("quickstart.ipynb", "explore_forecasts.ipynb")


def execute_notebook(name: str, workdir: Path, monkeypatch) -> nbformat.NotebookNode:
    """Run a notebook in its own folder; a failing cell raises ``CellExecutionError``."""
    monkeypatch.setenv("NOWCAST_NOTEBOOK_WORKDIR", str(workdir))
    # The explore notebook would load a user's checkpoint instead of training its own.
    monkeypatch.delenv("NOWCAST_CHECKPOINT", raising=False)
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    client.execute()
    return notebook


def displayed_images(notebook: nbformat.NotebookNode) -> int:
    return sum(
        "image/png" in output.get("data", {})
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
    )


@pytest.mark.slow
def test_quickstart_runs_the_pipeline_end_to_end(tmp_path, monkeypatch):
    notebook = execute_notebook("quickstart.ipynb", tmp_path, monkeypatch)
    workdir = tmp_path / "quickstart"
    metrics = pd.read_csv(workdir / "run" / "evaluation" / "metrics.csv")
    assert set(metrics["method"]) == {"persistence", "extrapolation", "model"}
    assert (workdir / "run" / "checkpoints" / "best.pt").is_file()
    # The YAML the notebook writes is a valid experiment config for the CLI.
    from nowcast.config import load_experiment

    assert load_experiment(workdir / "quickstart.yaml").name == "quickstart"
    (netcdf,) = (workdir / "run" / "netcdf").glob("*.nc")
    with xr.open_dataset(netcdf) as exported:
        assert exported["precip_intensity"].dims == ("lead_time", "y", "x")
        assert exported.attrs["nowcast_method"] == "model"
    # Map of the cube, training log, CSI curves, forecast panels, exported forecast.
    assert displayed_images(notebook) >= 5


@pytest.mark.slow
def test_explore_forecasts_trains_compares_and_exports(tmp_path, monkeypatch):
    notebook = execute_notebook("explore_forecasts.ipynb", tmp_path, monkeypatch)
    workdir = tmp_path / "explore"
    assert (workdir / "run_synthetic" / "checkpoints" / "best.pt").is_file()
    with xr.open_dataset(workdir / "forecast_model_synthetic.nc") as exported:
        assert exported["precip_intensity"].dims == ("lead_time", "y", "x")
        assert "crs_wkt" in exported["crs"].attrs
    # Wet-area series, patch sample, forecast panels, score curves, PCA spectrum and maps.
    assert displayed_images(notebook) >= 6


def test_committed_notebooks_have_no_outputs():
    paths = sorted(NOTEBOOKS.glob("*.ipynb"))
    assert {path.name for path in paths} >= set(NOTEBOOK_NAMES)
    for path in paths:
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
        code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
        assert code_cells, path.name
        for cell in code_cells:
            assert cell.outputs == [], f"{path.name}: a cell has outputs; clear them first"
            assert cell.execution_count is None, f"{path.name}: a cell has an execution count"
