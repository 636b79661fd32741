"""Zero-shot evaluation on a catalog source (nowcast.evaluate.zeroshot) and the model-vs-source
timestep rule (nowcast.windows.frames_per_model_step) in evaluate --source, predict and the model
method."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from conftest import REPO, synthetic_catalog
from test_predict import residual_checkpoint

from nowcast.config import ConfigError
from nowcast.evaluate.zeroshot import evaluate_source
from nowcast.nowcasts.model import ModelNowcast
from nowcast.predict import predict
from nowcast.sources.catalog import Catalog, SourceConfig
from nowcast.sources.ingest import ingest
from nowcast.training.checkpoint import PRETRAINED_CHECKPOINT, load_checkpoint, save_checkpoint
from nowcast.windows import (
    Timeline,
    counted_back,
    frame_step_note,
    frames_per_model_step,
    list_windows,
)

N_INPUT, N_TARGET = 3, 2


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def five_minute_catalog(**kwargs) -> Catalog:
    """The small synthetic source at a 5-minute step (a 10-minute model reads every 2nd)."""
    catalog = synthetic_catalog(**kwargs)
    source = catalog.sources["synthetic"].model_copy(update={"timestep": 5})
    return Catalog(sources={"synthetic": source})


# --------------------------------------------------------------------------------------------
# the rule


def test_rule_takes_every_kth_frame_counted_back_and_refuses_other_steps():
    assert frames_per_model_step(10, 5, "fmi") == 2
    assert frames_per_model_step(10, 10, "bom") == 1
    assert frames_per_model_step(30, 5, "knmi") == 6
    assert frame_step_note("bom", 10, 10) is None
    assert "every 2nd frame counted back" in frame_step_note("fmi", 5, 10)
    # Counted back from the last frame: with 6 frames, 3 every 2nd are 1, 3, 5 (5 = reference).
    np.testing.assert_array_equal(counted_back(6, 3, 2), [1, 3, 5])
    np.testing.assert_array_equal(counted_back(3, 3, 1), [0, 1, 2])
    with pytest.raises(ValueError, match="need 5 input frames, got 4"):
        counted_back(4, 3, 2)
    with pytest.raises(ConfigError) as err:
        frames_per_model_step(10, 6, "radar6")
    message = str(err.value)
    assert "radar6" in message and "6-minute" in message and "10-minute" in message
    assert "\n" not in message
    with pytest.raises(ConfigError, match="15-minute frames do not fit .* 10-minute"):
        frames_per_model_step(10, 15, "opera")


def test_strided_windows_start_at_every_frame_and_skip_invalid_ones(tmp_path):
    catalog = five_minute_catalog(n_frames=14, drop_times=["2000-01-01T00:25"])
    result = ingest(
        "synthetic", str(tmp_path), catalog=catalog, scheduler="threads", progress=False
    )
    path = result.path
    cube = xr.open_zarr(path)
    timeline = Timeline.from_cube("synthetic", path, cube)
    labels = np.full(len(timeline), "test", dtype=object)
    table = list_windows(timeline, labels, N_INPUT, N_TARGET, frame_step=2)
    # A window spans (3 + 2 - 1) * 2 + 1 = 9 frames; frame 5 (00:25) is missing, so windows
    # starting at odd frames 1 and 3 (which use frame 5) are out, even ones never touch it.
    assert table["start"].tolist() == [0, 2, 4]
    refs = pd.DatetimeIndex(table["reference_time"])
    assert list(refs.strftime("%H:%M")) == ["00:20", "00:30", "00:40"]
    assert frame_step_note("synthetic", 5, 10) is not None


# --------------------------------------------------------------------------------------------
# the model method and predict


def test_model_method_reads_a_five_minute_source_every_second_frame(tmp_path):
    checkpoint = residual_checkpoint(tmp_path / "model.pt", n_input=N_INPUT, n_target=4)
    method = ModelNowcast(checkpoint, device="cpu")
    times = pd.date_range("2000-01-01T00:00", periods=5, freq="5min")
    rng = np.random.default_rng(0)
    values = rng.gamma(1.0, 2.0, size=(5, 16, 16)).astype(np.float32)
    inputs = xr.DataArray(
        values,
        dims=("time", "y", "x"),
        coords={"time": times, "y": np.arange(16.0), "x": np.arange(16.0)},
    )
    inputs.attrs["crs_wkt"] = "EPSG:3035"
    forecast = method(inputs, 4)
    # Lead times at the model's 10 minutes, from the last frame; the residual untrained model
    # is persistence of the last frame (the reference time).
    assert (forecast["lead_time"].values / np.timedelta64(1, "m")).tolist() == [10, 20, 30, 40]
    assert pd.Timestamp(forecast["forecast_reference_time"].values) == times[-1]
    np.testing.assert_allclose(forecast.values[0], values[-1], rtol=1e-5, atol=1e-5)
    # The same as feeding frames 0, 2, 4 at 10 minutes by hand.
    by_hand = method(inputs.isel(time=[0, 2, 4]), 4)
    np.testing.assert_array_equal(forecast.values, by_hand.values)
    with pytest.raises(ValueError, match="need 5 input frames, got 4"):
        method(inputs.isel(time=slice(1, None)), 4)
    six = inputs.assign_coords(time=pd.date_range("2000-01-01", periods=5, freq="6min"))
    with pytest.raises(ConfigError, match="6-minute frames do not fit .* 10-minute"):
        method(six, 4)


def test_predict_on_a_five_minute_source_with_a_ten_minute_model(tmp_path):
    catalog = five_minute_catalog(n_frames=12)
    ingest(
        "synthetic", str(tmp_path / "cubes"), catalog=catalog, scheduler="threads", progress=False
    )
    checkpoint = residual_checkpoint(tmp_path / "model.pt", n_input=N_INPUT, n_target=4)
    from_cube = predict(
        "synthetic",
        checkpoint,
        cube_dir=str(tmp_path / "cubes"),
        out_dir=tmp_path / "a",
        catalog=catalog,
    )
    from_files = predict(
        "synthetic", checkpoint, from_files=True, out_dir=tmp_path / "b", catalog=catalog
    )
    assert from_cube.reference_time.startswith("2000-01-01T00:55")  # the newest 5-min frame
    assert "every 2nd frame" in from_cube.note and "note:" in from_cube.summary()
    a, b = xr.open_dataset(from_cube.netcdf), xr.open_dataset(from_files.netcdf)
    np.testing.assert_array_equal(a["precip_intensity"].values, b["precip_intensity"].values)
    assert (a["lead_time"].values / np.timedelta64(1, "m")).tolist() == [10, 20, 30, 40]
    cube = xr.open_zarr(tmp_path / "cubes" / "synthetic.zarr")
    last = cube["rain_rate"].sel(time="2000-01-01T00:55").values
    np.testing.assert_allclose(
        a["precip_intensity"].isel(lead_time=0).values, last, rtol=1e-5, atol=1e-5
    )
    six = Catalog(
        sources={"synthetic": catalog.sources["synthetic"].model_copy(update={"timestep": 6})}
    )
    with pytest.raises(ConfigError, match="6-minute frames do not fit .* 10-minute"):
        predict("synthetic", checkpoint, from_files=True, out_dir=tmp_path / "c", catalog=six)


# --------------------------------------------------------------------------------------------
# evaluate --source


def evaluate_five_minute_source(tmp_path: Path, **kwargs) -> dict:
    """evaluate_source on the 5-minute synthetic source, starts 00:25 .. 00:50, to ``zero/``."""
    checkpoint = kwargs.pop("checkpoint", None) or residual_checkpoint(
        tmp_path / "model.pt", n_input=N_INPUT, n_target=N_TARGET
    )
    return evaluate_source(
        "synthetic",
        catalog=five_minute_catalog(n_frames=16),
        checkpoint=checkpoint,
        start=pd.Timestamp("2000-01-01T00:25").to_pydatetime(),
        end=pd.Timestamp("2000-01-01T00:50").to_pydatetime(),
        out_dir=tmp_path / "zero",
        cube_dir=str(tmp_path / "cubes"),
        scheduler="threads",
        progress=False,
        figures=False,
        **kwargs,
    )


def test_evaluate_source_on_a_synthetic_five_minute_source(tmp_path, capsys):
    out = tmp_path / "zero"
    outputs = evaluate_five_minute_source(tmp_path)
    printed = capsys.readouterr().out
    assert "ingesting it first" in printed  # no cube yet
    assert "every 2nd frame counted back" in printed
    assert outputs["folder"] == str(out) and outputs["figures"] == []
    for name in ("metrics.csv", "metrics.json", "differences.csv", "report.md"):
        assert (out / name).is_file()
    metrics = pd.read_csv(out / "metrics.csv")
    assert set(metrics["method"]) == {"persistence", "extrapolation", "sprog", "model"}
    assert sorted(metrics["lead_time"].unique()) == [10.0, 20.0]
    summary = json.loads((out / "metrics.json").read_text())
    info = summary["sources"]["synthetic"]
    # 16 frames of 5 min: a window needs 9 (00:00 .. 00:40 for the reference 00:20), so starts
    # 00:20 .. 00:55 are valid; every 5-min one from --start 00:25 to --end 00:50 is scored.
    assert info["first"] == "2000-01-01T00:25:00" and info["last"] == "2000-01-01T00:50:00"
    assert info["n_windows"] == 6
    zero = summary["zero_shot"]
    assert zero["frame_stride"] == 2 and zero["source_pixel_size_m"] == 1000.0
    # The untrained residual ConvLSTM is persistence of the last frame.
    csi = metrics[(metrics["score"] == "CSI") & np.isclose(metrics["threshold"], 1.0)]
    by_method = csi.set_index(["method", "lead_time"])["value"]
    np.testing.assert_allclose(by_method["model"], by_method["persistence"], atol=1e-6)
    report = (out / "report.md").read_text()
    assert "every 2nd frame counted back" in report
    assert "native grid" in report and "1000 m" in report
    # The store of this checkpoint named no cube, so make_checkpoint recorded no pixel size.
    assert "training pixel size is not recorded" in report
    assert "one start every 5.0 min" in report
    assert "Catalog source `synthetic` (zero-shot); methods:" in report and "Split" not in report


def test_evaluate_source_errors_are_one_line(tmp_path):
    catalog = five_minute_catalog(n_frames=16)
    checkpoint = residual_checkpoint(tmp_path / "model.pt", n_input=N_INPUT, n_target=N_TARGET)
    kwargs = dict(catalog=catalog, cube_dir=str(tmp_path / "cubes"), scheduler="threads")
    with pytest.raises(ConfigError, match="unknown source 'nope'"):
        evaluate_source("nope", checkpoint=checkpoint, **kwargs)
    with pytest.raises(ConfigError, match="checkpoint not found"):
        evaluate_source("synthetic", checkpoint=tmp_path / "missing.pt", **kwargs)
    late = pd.Timestamp("2000-01-02").to_pydatetime()
    with pytest.raises(ConfigError, match="no forecast start between"):
        evaluate_source("synthetic", checkpoint=checkpoint, start=late, progress=False, **kwargs)
    six = Catalog(
        sources={"synthetic": catalog.sources["synthetic"].model_copy(update={"timestep": 6})}
    )
    kwargs["catalog"], kwargs["cube_dir"] = six, str(tmp_path / "cubes6")
    with pytest.raises(ConfigError, match="synthetic: 6-minute frames do not fit .* 10-minute"):
        evaluate_source("synthetic", checkpoint=checkpoint, progress=False, **kwargs)


def test_a_checkpoint_without_a_schema_key_is_a_one_line_error(tmp_path):
    checkpoint = residual_checkpoint(tmp_path / "model.pt", n_input=N_INPUT, n_target=N_TARGET)
    state = load_checkpoint(checkpoint)
    del state["pixel_size_m"], state["motion_stride"]
    save_checkpoint(checkpoint, state)
    with pytest.raises(ConfigError, match="lacks the checkpoint keys pixel_size_m, motion_stride"):
        evaluate_five_minute_source(tmp_path, checkpoint=checkpoint)
    with pytest.raises(ConfigError, match="lacks the checkpoint keys"):
        ModelNowcast(checkpoint, device="cpu")


def test_cli_evaluate_needs_exactly_one_of_config_or_source():
    from typer.testing import CliRunner

    from nowcast.cli import app

    runner = CliRunner()
    for args in (["evaluate"], ["evaluate", "x.yaml", "--source", "bom"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2  # usage
        assert "exactly one of CONFIG or --source" in result.output
    result = runner.invoke(app, ["evaluate", "x.yaml", "--start", "2020-10-31T08:00"])
    assert result.exit_code == 2 and "--start only apply with --source" in result.output


# --------------------------------------------------------------------------------------------
# real data: the pretrained 10-minute BoM model on the 5-minute FMI 2016 composites


def test_pretrained_model_zero_shot_on_fmi_2016(catalog, tmp_path):
    assert PRETRAINED_CHECKPOINT.is_file() and PRETRAINED_CHECKPOINT.is_relative_to(REPO)
    meta = load_checkpoint(PRETRAINED_CHECKPOINT)
    assert meta["timestep_minutes"] == 10 and meta["pixel_size_m"] == {"bom": 500.0}
    # Only the frames of two starts (16:00, 16:05: 15:10 .. 17:05), to keep the test short.
    fmi = SourceConfig.model_validate(
        {
            **catalog.sources["fmi_2016"].model_dump(),
            "start": "2016-09-28T15:10",
            "end": "2016-09-28T17:05",
        }
    )
    small = Catalog(sources={"fmi_2016": fmi})  # no bom: the checkpoint records its grid
    outputs = evaluate_source(
        "fmi_2016",
        catalog=small,
        out_dir=tmp_path / "out",
        cube_dir=str(tmp_path / "cubes"),
        scheduler="threads",
        progress=False,
        figures=False,
    )
    summary = json.loads(Path(outputs["metrics_json"]).read_text())
    info = summary["sources"]["fmi_2016"]
    assert info["reference_times"] == ["2016-09-28T16:00:00", "2016-09-28T16:05:00"]
    zero = summary["zero_shot"]
    assert zero["frame_stride"] == 2 and zero["grid_shape"] == [1226, 760]
    assert abs(zero["source_pixel_size_m"] - 1000) < 1
    assert zero["training_pixel_size_m"] == {"bom": 500.0}
    report = Path(outputs["report"]).read_text()
    assert "500 m (bom)" in report and "every 2nd frame counted back" in report
    metrics = pd.read_csv(outputs["metrics_csv"])
    csi = metrics[(metrics["score"] == "CSI") & np.isclose(metrics["threshold"], 1.0)]
    csi = csi.set_index(["method", "lead_time"])["value"]
    # A working zero-shot model on FMI rain: better than persistence at 10 min, skill > 0.3.
    assert csi["model", 10.0] > csi["persistence", 10.0]
    assert csi["model", 10.0] > 0.3


def test_evaluate_source_thins_starts_with_window_stride(tmp_path):
    out = tmp_path / "zero"
    evaluate_five_minute_source(tmp_path, window_stride=2)
    info = json.loads((out / "metrics.json").read_text())["sources"]["synthetic"]
    # Every second of the six 5-minute starts 00:25 .. 00:50.
    assert info["reference_times"] == [f"2000-01-01T00:{m}:00" for m in ("25", "35", "45")]
    assert "one start every 10.0 min" in (out / "report.md").read_text()


def test_cli_window_stride_thins_the_starts_and_refuses_zero(tmp_path):
    import yaml
    from typer.testing import CliRunner

    from nowcast.cli import app

    source = five_minute_catalog(n_frames=16).sources["synthetic"]
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(
        yaml.safe_dump({"sources": {"synthetic": source.model_dump(mode="json", exclude={"name"})}})
    )
    checkpoint = residual_checkpoint(tmp_path / "model.pt", n_input=N_INPUT, n_target=N_TARGET)
    out = tmp_path / "zero"
    args = [
        "evaluate", "--source", "synthetic", "--catalog", str(catalog),
        "--checkpoint", str(checkpoint), "--cube-dir", str(tmp_path / "cubes"),
        "--out-dir", str(out), "--start", "2000-01-01T00:25", "--end", "2000-01-01T00:50",
        "--no-figures", "--scheduler", "threads",
    ]  # fmt: skip
    runner = CliRunner()
    result = runner.invoke(app, [*args, "--window-stride", "0"])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert "--window-stride must be at least 1, got 0" in lines[0]
    assert not out.exists()
    result = runner.invoke(app, [*args, "--window-stride", "3"])
    assert result.exit_code == 0, result.output
    info = json.loads((out / "metrics.json").read_text())["sources"]["synthetic"]
    # Every third of the six 5-minute starts 00:25 .. 00:50.
    assert info["reference_times"] == ["2000-01-01T00:25:00", "2000-01-01T00:40:00"]
    result = runner.invoke(app, ["evaluate", "x.yaml", "--window-stride", "2"])
    assert result.exit_code == 2 and "--window-stride only apply with --source" in result.output


def test_matched_ensemble_zero_shot_on_knmi(catalog, tmp_path):
    """pipelines/configs/ensemble_zero_shot.yaml on a radar the ensemble never saw: matching the
    members to the last frame (STEPS' cdf) removes the raw members' excess rain."""
    from nowcast.config import load_experiment

    declared = load_experiment(REPO / "pipelines" / "configs" / "ensemble_zero_shot.yaml")
    knmi = SourceConfig.model_validate(
        {
            **catalog.sources["knmi"].model_dump(),
            "start": "2010-08-26T03:10",
            "end": "2010-08-26T05:00",
        }
    )
    outputs = evaluate_source(
        "knmi",
        catalog=Catalog(sources={"knmi": knmi}),
        out_dir=tmp_path / "out",
        cube_dir=str(tmp_path / "cubes"),
        scheduler="threads",
        progress=False,
        figures=False,
        methods=declared.evaluate["methods"],
        forecast_methods=declared.forecast_methods,
        method_kwargs=declared.evaluate["method_kwargs"],
        members=4,
    )
    info = json.loads(Path(outputs["metrics_json"]).read_text())["sources"]["knmi"]
    assert info["reference_times"] == ["2010-08-26T04:00:00"]
    table = pd.read_csv(outputs["ensemble_metrics_csv"])
    table = table[table["threshold"].isna() & table["scale"].isna()]
    score = table.set_index(["score", "method", "lead_time"])["value"]
    for lead in (30.0, 60.0):
        assert score["CRPS", "ensemble_cdf", lead] < score["CRPS", "ensemble", lead]
        raw, matched = (
            abs(score["SPREAD_SKILL", m, lead] - 1) for m in ("ensemble", "ensemble_cdf")
        )
        assert matched < raw
