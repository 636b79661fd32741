"""The xarray decoder of CF netCDF sources gives what ``xarray.open_dataset`` gives."""

from __future__ import annotations

import netCDF4
import numpy as np
import pytest
import xarray as xr

from nowcast.sources.catalog import SourceConfig, list_frames
from nowcast.sources.readers import FrameReadError, _decode_xarray


def _open_dataset_reference(path, variable: str) -> np.ndarray:
    """The decode as ingest did it with ``xr.open_dataset`` (the reference)."""
    with xr.open_dataset(path, engine="netcdf4", cache=False) as ds:
        field = ds[variable].squeeze()
        if "y" in field.dims and field["y"].size > 1 and field["y"][0] < field["y"][-1]:
            field = field.isel(y=slice(None, None, -1))
        return np.squeeze(field.values)


def _source(catalog, variable: str = "rain") -> SourceConfig:
    return catalog["bom"].model_copy(update={"variable": variable})


def _write(path, *, y_values, leading_time: bool, scaled: bool) -> None:
    rng = np.random.default_rng(0)
    with netCDF4.Dataset(path, "w") as nc:
        dims = ("time", "y", "x") if leading_time else ("y", "x")
        if leading_time:
            nc.createDimension("time", 1)
        nc.createDimension("y", 5)
        nc.createDimension("x", 4)
        if y_values is not None:
            nc.createVariable("y", "f8", ("y",))[:] = y_values
        dtype, fill = ("i2", -1) if scaled else ("f4", -999.0)
        rain = nc.createVariable("rain", dtype, dims, fill_value=fill)
        if scaled:
            rain.scale_factor, rain.add_offset = 0.05, 0.0
        values = rng.uniform(0, 20, (1, 5, 4) if leading_time else (5, 4))
        values.flat[3] = np.nan  # stored as the fill value
        rain[:] = np.ma.array(np.nan_to_num(values), mask=np.isnan(values))


@pytest.mark.parametrize(
    "y_values, leading_time, scaled",
    [
        (np.arange(5.0), True, True),  # south-up, scaled int16, a time axis of one
        (np.arange(5.0)[::-1], False, True),  # north-up
        (None, False, False),  # no y coordinate variable: flipped, as xarray's index counts up
    ],
)
def test_decode_equals_open_dataset(catalog, tmp_path, y_values, leading_time, scaled):
    path = tmp_path / "frame.nc"
    _write(path, y_values=y_values, leading_time=leading_time, scaled=scaled)
    expected = _open_dataset_reference(path, "rain")
    actual = _decode_xarray(_source(catalog), str(path))
    assert actual.dtype == expected.dtype and actual.shape == expected.shape == (5, 4)
    np.testing.assert_array_equal(actual, expected)
    assert np.isnan(actual).sum() == 1


def test_bom_files_decode_as_open_dataset(catalog):
    source = catalog["bom"]
    for frame in list_frames(source)[::29]:
        expected = _open_dataset_reference(frame.path, source.variable)
        actual = _decode_xarray(source, frame.path)
        assert actual.dtype == expected.dtype
        np.testing.assert_array_equal(actual, expected)


def test_missing_variable_and_bad_file_are_read_errors(catalog, tmp_path):
    path = tmp_path / "frame.nc"
    _write(path, y_values=np.arange(5.0), leading_time=False, scaled=True)
    with pytest.raises(FrameReadError, match="KeyError|IndexError"):
        _decode_xarray(_source(catalog, "no_such_variable"), str(path))
    path.write_bytes(b"not netCDF")
    with pytest.raises(FrameReadError, match=str(path)):
        _decode_xarray(_source(catalog), str(path))
