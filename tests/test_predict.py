"""Operational predict: newest frames -> model -> CF NetCDF + map, and clear input errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr
from conftest import synthetic_catalog

from nowcast.checkpoint import make_checkpoint, save_checkpoint
from nowcast.ingest import ingest
from nowcast.models import build_model
from nowcast.predict import InputFramesError, predict

MODEL_KWARGS = {"patch_factor": 2, "hidden_channels": [4], "kernel_sizes": [3], "residual": True}


def residual_checkpoint(path, n_input=3, n_target=4, timestep=10) -> str:
    """An untrained residual ConvLSTM: it forecasts exactly persistence of the last frame."""
    torch.manual_seed(0)
    model = build_model("convlstm", n_input, n_target, **MODEL_KWARGS)
    checkpoint = make_checkpoint(
        model=model,
        optimizer=torch.optim.AdamW(model.parameters()),
        scheduler_state={},
        scaler=torch.amp.GradScaler("cpu", enabled=False),
        config={},
        experiment="test",
        model_name="convlstm",
        model_kwargs=MODEL_KWARGS,
        store_info={
            "n_input_frames": n_input,
            "n_target_frames": n_target,
            "timestep_minutes": timestep,
            "normalization": {"method": "log1p", "params": {"scale": 4.0}},
        },
        step=0,
        epoch=0,
        batch_index=0,
        best_metric=float("inf"),
    )
    save_checkpoint(path, checkpoint)
    return str(path)


@pytest.fixture
def synthetic_setup(tmp_path):
    catalog = synthetic_catalog(n_frames=12, drop_times=["2000-01-01T01:10"])
    ingest(
        "synthetic", str(tmp_path / "cubes"), catalog=catalog, scheduler="threads", progress=False
    )
    return catalog, tmp_path, residual_checkpoint(tmp_path / "model.pt")


def test_predict_latest_writes_netcdf_and_map(synthetic_setup):
    catalog, tmp_path, checkpoint = synthetic_setup
    result = predict(
        "synthetic",
        checkpoint,
        cube_dir=str(tmp_path / "cubes"),
        out_dir=tmp_path / "out",
        catalog=catalog,
    )
    assert result.reference_time.startswith("2000-01-01T01:50")  # the newest frame
    ds = xr.open_dataset(result.netcdf)
    assert ds["rain_rate"].sizes == {"lead_time": 4, "y": 64, "x": 64}
    assert len(ds.attrs["model_checkpoint_sha256"]) == 64
    # The untrained residual model is persistence: every lead equals the last input frame.
    cube = xr.open_zarr(tmp_path / "cubes" / "synthetic.zarr")
    last = cube["rain_rate"].sel(time="2000-01-01T01:50").values
    for lead in range(4):
        np.testing.assert_allclose(
            ds["rain_rate"].isel(lead_time=lead).values, last, rtol=1e-5, atol=1e-5
        )
    from PIL import Image

    assert Image.open(result.map_png).size[0] > 300


def test_predict_from_raw_files_equals_from_cube(synthetic_setup):
    catalog, tmp_path, checkpoint = synthetic_setup
    kwargs = dict(catalog=catalog, at=pd.Timestamp("2000-01-01T00:50").to_pydatetime())
    from_cube = predict(
        "synthetic", checkpoint, cube_dir=str(tmp_path / "cubes"), out_dir=tmp_path / "a", **kwargs
    )
    from_files = predict("synthetic", checkpoint, from_files=True, out_dir=tmp_path / "b", **kwargs)
    a, b = xr.open_dataset(from_cube.netcdf), xr.open_dataset(from_files.netcdf)
    np.testing.assert_array_equal(a["rain_rate"].values, b["rain_rate"].values)


def test_predict_across_a_gap_is_a_clear_error(synthetic_setup):
    catalog, tmp_path, checkpoint = synthetic_setup
    at = pd.Timestamp("2000-01-01T01:20").to_pydatetime()  # needs 01:00, 01:10 (gap), 01:20
    with pytest.raises(InputFramesError, match="01:10"):
        predict(
            "synthetic",
            checkpoint,
            at=at,
            cube_dir=str(tmp_path / "cubes"),
            out_dir=tmp_path / "out",
            catalog=catalog,
        )
    with pytest.raises(InputFramesError, match="01:10"):
        predict(
            "synthetic",
            checkpoint,
            at=at,
            from_files=True,
            out_dir=tmp_path / "out",
            catalog=catalog,
        )
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.nc"))
