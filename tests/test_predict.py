"""Operational predict: newest frames -> model -> CF NetCDF + map, and clear input errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr
from conftest import BAD_CHECKPOINTS, bad_checkpoint, synthetic_catalog

from nowcast.config import ConfigError
from nowcast.models.registry import build_model
from nowcast.patches.normalization import Normalization
from nowcast.predict import InputFramesError, predict
from nowcast.sources.ingest import ingest
from nowcast.storage import DiskWriteError
from nowcast.training.checkpoint import TrainedOn, make_checkpoint, save_checkpoint
from nowcast.windows import FrameSpec

MODEL_KWARGS = {"patch_factor": 2, "hidden_channels": [4], "kernel_sizes": [3], "residual": True}


def residual_checkpoint(
    path, n_input=3, n_target=4, timestep=10, model_name="convlstm", model_kwargs=None
) -> str:
    """A checkpoint of an untrained model; by default a residual ConvLSTM, which forecasts
    exactly persistence of the last frame."""
    model_kwargs = MODEL_KWARGS if model_kwargs is None else model_kwargs
    torch.manual_seed(0)
    model = build_model(model_name, n_input, n_target, **model_kwargs)
    checkpoint = make_checkpoint(
        model=model,
        optimizer=torch.optim.AdamW(model.parameters()),
        scheduler_state={},
        scaler=torch.amp.GradScaler("cpu", enabled=False),
        config={},
        experiment="test",
        model_name=model_name,
        model_kwargs=model_kwargs,
        trained_on=TrainedOn(
            Normalization("log1p", {"scale": 4.0}), FrameSpec(n_input, n_target, timestep)
        ),
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
    assert ds["precip_intensity"].sizes == {"lead_time": 4, "y": 64, "x": 64}
    assert len(ds.attrs["model_checkpoint_sha256"]) == 64
    # The untrained residual model is persistence: every lead equals the last input frame.
    cube = xr.open_zarr(tmp_path / "cubes" / "synthetic.zarr")
    last = cube["rain_rate"].sel(time="2000-01-01T01:50").values
    for lead in range(4):
        np.testing.assert_allclose(
            ds["precip_intensity"].isel(lead_time=lead).values, last, rtol=1e-5, atol=1e-5
        )
    from PIL import Image

    assert Image.open(result.map_png).size[0] > 300


def test_predict_writes_a_manifest_of_the_set_last(synthetic_setup, monkeypatch):
    from matplotlib.figure import Figure

    catalog, tmp_path, checkpoint = synthetic_setup
    out = tmp_path / "out"
    kwargs = dict(cube_dir=str(tmp_path / "cubes"), out_dir=out, catalog=catalog)
    result = predict("synthetic", checkpoint, **kwargs)
    manifest = Path(result.manifest)
    assert manifest.parent == out and f"manifest: {manifest}" in result.summary()
    record = json.loads(manifest.read_text())
    files = sorted(p for p in out.iterdir() if p.stem == manifest.stem and p != manifest)
    assert [p.name for p in files] == sorted([Path(result.netcdf).name, Path(result.map_png).name])
    assert record == {
        "reference_time": result.reference_time,
        "source": "synthetic",
        "method": "model",
        "files": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files},
    }

    # A rerun for the same time that fails in the map: the set is incomplete, so no manifest.
    def failing_savefig(self, path, *args, **kwargs):
        Path(path).write_bytes(b"\x89PNG partial")
        raise RuntimeError("cannot draw")

    monkeypatch.setattr(Figure, "savefig", failing_savefig)
    with pytest.raises(RuntimeError, match="cannot draw"):
        predict("synthetic", checkpoint, **kwargs)
    assert sorted(p.name for p in out.iterdir()) == [p.name for p in files]  # no temporaries
    monkeypatch.undo()

    # Too little room: stopped before any write, and the complete set (manifest) stays.
    again = predict("synthetic", checkpoint, **kwargs)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr("nowcast.storage.free_bytes", lambda path: 4096)
    with pytest.raises(DiskWriteError, match=f"{out}: not enough free disk space"):
        predict("synthetic", checkpoint, **kwargs)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert json.loads(Path(again.manifest).read_text())["files"].keys() == record["files"].keys()


def test_predict_from_raw_files_equals_from_cube(synthetic_setup):
    catalog, tmp_path, checkpoint = synthetic_setup
    kwargs = dict(catalog=catalog, at=pd.Timestamp("2000-01-01T00:50").to_pydatetime())
    from_cube = predict(
        "synthetic", checkpoint, cube_dir=str(tmp_path / "cubes"), out_dir=tmp_path / "a", **kwargs
    )
    from_files = predict("synthetic", checkpoint, from_files=True, out_dir=tmp_path / "b", **kwargs)
    a, b = xr.open_dataset(from_cube.netcdf), xr.open_dataset(from_files.netcdf)
    np.testing.assert_array_equal(a["precip_intensity"].values, b["precip_intensity"].values)


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


@pytest.mark.parametrize(
    "model_name, model_kwargs",
    [
        ("convlstm", {"patch_factor": 4, "hidden_channels": [8, 8], "kernel_sizes": [3, 3]}),
        ("cnn_lstm", {"tile_size": 16, "conv_channels": [4, 8], "lstm_hidden": 32}),
        ("fc_lstm", {"tile_size": 8, "hidden_size": 32, "num_layers": 1}),
    ],
)
def test_every_registered_model_runs_through_predict_and_export(
    synthetic_setup, model_name, model_kwargs
):
    from nowcast.export import export
    from nowcast.models.registry import registered_models

    assert model_name in registered_models()
    catalog, tmp_path, _ = synthetic_setup
    checkpoint = residual_checkpoint(
        tmp_path / f"{model_name}.pt", model_name=model_name, model_kwargs=model_kwargs
    )
    result = predict(
        "synthetic",
        checkpoint,
        cube_dir=str(tmp_path / "cubes"),
        out_dir=tmp_path / model_name,
        catalog=catalog,
    )
    with xr.open_dataset(result.netcdf) as ds:
        assert ds["precip_intensity"].sizes == {"lead_time": 4, "y": 64, "x": 64}
        assert np.isfinite(ds["precip_intensity"].values).any()

    from nowcast.config import ExperimentConfig
    from nowcast.patches.build import build_patches

    longer = synthetic_catalog(n_frames=30)
    ingest(
        "synthetic", str(tmp_path / "cubes30"), catalog=longer, scheduler="threads", progress=False
    )
    experiment = ExperimentConfig(
        name="syn",
        sources=["synthetic"],
        cube_dir=str(tmp_path / "cubes30"),
        patch_dir=str(tmp_path / "patches"),
        run_dir=str(tmp_path / f"run_{model_name}"),
        patches={
            "n_input_frames": 3,
            "n_target_frames": 4,
            "patch_size": 32,
            "stride": 32,
            "split_fractions": {"train": 0.3, "val": 0.3, "test": 0.4},
            "buffer_minutes": 0,
            "min_wet_fraction": 0.0,
        },
        export={"methods": ["model"], "checkpoint": checkpoint, "max_forecasts": 1},
    )
    build_patches(experiment, scheduler="threads", progress=False)
    paths = export(experiment)
    assert len(paths) == 1
    with xr.open_dataset(paths[0]) as ds:
        assert ds.attrs["nowcast_method"] == "model"


def test_predict_applies_a_forecast_method_variant_as_evaluate_does(synthetic_setup):
    """--method model_mix: the model blended with extrapolation and CDF-matched, same function."""
    from nowcast.nowcasts.inputs import cube_inputs
    from nowcast.nowcasts.interface import get_method
    from nowcast.nowcasts.variants import apply_variant, parse_variants

    catalog, tmp_path, checkpoint = synthetic_setup
    variants = {
        "model_mix": {
            "method": "model",
            "blend": {"method": "extrapolation", "weights": [0.5]},
            "postprocess": {"method": "cdf"},
        }
    }
    at = pd.Timestamp("2000-01-01T00:50")
    result = predict(
        "synthetic",
        checkpoint,
        at=at.to_pydatetime(),
        cube_dir=str(tmp_path / "cubes"),
        out_dir=tmp_path / "out",
        catalog=catalog,
        method="model_mix",
        forecast_methods=variants,
    )
    written = xr.open_dataset(result.netcdf)["precip_intensity"].values
    cube = xr.open_zarr(tmp_path / "cubes" / "synthetic.zarr")
    inputs = cube_inputs(cube, at, 3)
    bases = {
        "model": get_method("model")(checkpoint=checkpoint)(inputs, 4),
        "extrapolation": get_method("extrapolation")(inputs, 4),
    }
    spec = parse_variants(variants)["model_mix"]
    expected = apply_variant("model_mix", spec, bases, inputs).values
    np.testing.assert_allclose(written, expected, rtol=1e-5, atol=1e-5)
    assert not np.allclose(written, bases["model"].values, equal_nan=True)
    with pytest.raises(ConfigError, match="unknown forecast method 'model_nope'"):
        predict(
            "synthetic",
            checkpoint,
            cube_dir=str(tmp_path / "cubes"),
            catalog=catalog,
            method="model_nope",
            forecast_methods=variants,
            out_dir=tmp_path / "x",
        )


@pytest.mark.parametrize(
    "args",
    [
        ["predict", "--source", "nosuch", "--latest"],
        ["data", "--source", "nosuch"],
    ],
)
def test_an_unknown_source_is_named_as_such(args, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from nowcast.cli import app

    monkeypatch.chdir(tmp_path)  # no cube of any name here
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    assert "unknown source 'nosuch'" in result.output
    assert "no cube" not in result.output and "0 files" not in result.output


@pytest.mark.parametrize("kind", list(BAD_CHECKPOINTS))
@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_a_bad_checkpoint_is_one_line_that_says_what_is_wrong(kind, command, tmp_path):
    from typer.testing import CliRunner

    from nowcast.cli import app

    checkpoint = bad_checkpoint(kind, residual_checkpoint(tmp_path / "good.pt"), tmp_path)
    args = {
        "predict": ["predict", "--source", "bom", "--at", "2020-10-31T09:50"],
        "evaluate": ["evaluate", "--source", "bom", "--cube-dir", str(tmp_path / "cubes")],
    }[command]
    result = CliRunner().invoke(app, [*args, "--checkpoint", checkpoint])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert checkpoint in lines[0] and BAD_CHECKPOINTS[kind] in lines[0]
