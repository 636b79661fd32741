"""Maps in the radar projection (offline), animations and score plots."""

from __future__ import annotations

import logging
import socket
import warnings

import cartopy
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pyproj  # noqa: E402
import pytest  # noqa: E402
import shapefile  # noqa: E402  (pyshp, a cartopy dependency)
from cartopy.mpl.feature_artist import FeatureArtist  # noqa: E402
from cartopy.mpl.geoaxes import GeoAxes  # noqa: E402
from conftest import synthetic_catalog  # noqa: E402
from matplotlib.collections import PolyCollection  # noqa: E402
from PIL import Image  # noqa: E402

from nowcast.nowcasts.forecast import make_forecast
from nowcast.sources.cube import cube_crs, open_cube
from nowcast.sources.ingest import ingest
from nowcast.visualization import coastlines
from nowcast.visualization.coastlines import basemap
from nowcast.visualization.maps import (
    NO_DATA_COLOR,
    animate_forecast,
    cartopy_crs,
    grid_extent,
    plot_forecast_panels,
    plot_rain_rate,
)
from nowcast.visualization.plots import (
    method_styles,
    plot_continuous_scores,
    plot_score_vs_lead_time,
)

# Radar CRSs as the pysteps importers describe them (KNMI already converted to metres).
RADAR_CRS = {
    "bom": "+proj=aea +lat_0=-27.718 +lon_0=153.24 +lat_1=-26.2 +lat_2=-29.3 +datum=WGS84",
    "fmi": "+proj=stere +lat_0=90 +lat_ts=60 +lon_0=25 +x_0=380886.31 +y_0=3395677.92 +R=6371288",
    "knmi": "+proj=stere +lat_0=90 +lat_ts=60 +lon_0=0 +a=6378137 +rf=298.252840776245",
    "opera": "+proj=laea +lat_0=55 +lon_0=10 +x_0=1950000 +y_0=-2100000 +ellps=WGS84",
    "synthetic": "+proj=laea +lat_0=52 +lon_0=10 +ellps=WGS84",
}
# A point inside each domain (lon, lat).
RADAR_SITE = {
    "bom": (153.24, -27.72),
    "fmi": (25.0, 62.0),
    "knmi": (5.2, 52.1),
    "opera": (10.0, 55.0),
    "synthetic": (10.0, 52.0),
}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No network: every connection attempt fails at once, as on a machine without one."""

    def refuse(*args, **kwargs):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    coastlines._basemap.cache_clear()
    yield
    coastlines._basemap.cache_clear()
    plt.close("all")


@pytest.fixture(scope="module")
def synthetic_cube(tmp_path_factory):
    cube_dir = tmp_path_factory.mktemp("cubes")
    catalog = synthetic_catalog(n_frames=12)
    path = ingest("synthetic", str(cube_dir), catalog=catalog, scheduler="threads", progress=False)
    return open_cube(path.path)


def forecasts_from(cube, index: int, n_lead: int = 6):
    """Observation after ``index`` and two fake forecasts (persistence, the observation)."""
    observed = cube["rain_rate"].isel(time=slice(index + 1, index + 1 + n_lead)).load()
    last = cube["rain_rate"].isel(time=[index]).values
    reference = cube["time"].values[index]
    persistence = make_forecast(
        np.repeat(last, n_lead, axis=0), reference, 10, cube, method="persistence"
    )
    perfect = make_forecast(observed.values, reference, 10, cube, method="perfect")
    return observed, {"persistence": persistence, "perfect": perfect}


def png_pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)


def feature_artists(ax) -> list:
    return [a for a in ax.get_children() if isinstance(a, FeatureArtist)]


@pytest.mark.parametrize("name", sorted(RADAR_CRS))
def test_cartopy_crs_is_the_radar_projection(name):
    crs = pyproj.CRS.from_wkt(pyproj.CRS.from_proj4(RADAR_CRS[name]).to_wkt())
    lon, lat = RADAR_SITE[name]
    x, y = pyproj.Transformer.from_crs("EPSG:4326", crs, always_xy=True).transform(lon, lat)
    extent = (x - 1e5, x + 1e5, y - 1e5, y + 1e5)
    projection = cartopy_crs(crs, extent)
    assert pyproj.CRS(projection) == crs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # to_dict warns that PROJ strings lose information
        assert projection.to_dict() == crs.to_dict()
    px, py = projection.transform_point(lon, lat, cartopy.crs.PlateCarree())
    assert (px, py) == pytest.approx((x, y), abs=0.01)
    x0, x1, y0, y1 = projection.bounds
    assert x0 < extent[0] and x1 > extent[1] and y0 < extent[2] and y1 > extent[3]


def test_cartopy_crs_needs_the_extent_of_a_custom_crs():
    with pytest.raises(ValueError, match="extent"):
        cartopy_crs(pyproj.CRS.from_proj4(RADAR_CRS["fmi"]))


def test_bom_map_renders_offline_in_the_radar_projection(bom_cube, tmp_path):
    cube = open_cube(bom_cube)
    field = cube["rain_rate"].isel(time=60).load()
    path = tmp_path / "bom.png"
    ax = plot_rain_rate(None, field, cube_crs(cube), title="BoM 10:00 UTC", path=path)

    assert isinstance(ax, GeoAxes)
    assert pyproj.CRS(ax.projection) == cube_crs(cube)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert ax.projection.to_dict() == cube_crs(cube).to_dict()
    image = ax.get_images()[0]
    assert image.get_extent() == pytest.approx(grid_extent(field))
    # North-up data (y descending) drawn with origin "upper": no flip.
    np.testing.assert_array_equal(np.ma.filled(image.get_array(), np.nan), field.values)
    colorbar_axes = [a for a in ax.figure.axes if a is not ax]
    assert "mm h" in colorbar_axes[0].get_ylabel()
    # Brisbane's coast lies in the domain: an offline coastline is drawn there.
    assert basemap().description != "none"
    assert feature_artists(ax)

    pixels = png_pixels(path)
    assert path.stat().st_size > 30_000
    assert pixels.std() > 20  # not blank


def test_synthetic_map_shows_no_data_in_grey(synthetic_cube, tmp_path):
    field = synthetic_cube["rain_rate"].isel(time=5).load()
    assert np.isnan(field.values).any()  # outside the synthetic radar range
    path = tmp_path / "synthetic.png"
    ax = plot_rain_rate(None, field, cube_crs(synthetic_cube), title="synthetic", path=path)
    grey = np.array(matplotlib.colors.to_rgb(NO_DATA_COLOR)) * 255
    pixels = png_pixels(path)
    assert (np.abs(pixels - grey).sum(axis=-1) < 3).mean() > 0.02
    colorbar_axes = [a for a in ax.figure.axes if a is not ax][0]
    legend = colorbar_axes.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["no data"]


def test_forecast_panels_grid(synthetic_cube, tmp_path):
    observed, forecasts = forecasts_from(synthetic_cube, 4)
    path = tmp_path / "panels.png"
    fig = plot_forecast_panels(observed, forecasts, lead_times_minutes=(10, 30, 60), path=path)
    geo_axes = [a for a in fig.axes if isinstance(a, GeoAxes)]
    assert len(geo_axes) == 3 * 3
    assert [a.get_title() for a in geo_axes[:3]] == [
        "+10 min (valid 00:50 UTC)",
        "+30 min (valid 01:10 UTC)",
        "+60 min (valid 01:40 UTC)",
    ]
    row_labels = {t.get_text() for a in geo_axes[::3] for t in a.texts}
    assert row_labels == {"observed", "persistence", "perfect"}
    # The "perfect" row shows the observation and persistence row repeats the last frame.
    for col in range(3):
        observed_image = geo_axes[col].get_images()[0].get_array()
        perfect_image = geo_axes[6 + col].get_images()[0].get_array()
        np.testing.assert_array_equal(observed_image, perfect_image)
    assert png_pixels(path).std() > 20


def test_forecast_panels_pick_observed_frames_by_valid_time(synthetic_cube):
    observed, forecasts = forecasts_from(synthetic_cube, 4)
    fig = plot_forecast_panels(
        synthetic_cube["rain_rate"], {"perfect": forecasts["perfect"]}, (20, 40)
    )
    geo_axes = [a for a in fig.axes if isinstance(a, GeoAxes)]
    for col in range(2):
        np.testing.assert_array_equal(
            geo_axes[col].get_images()[0].get_array(),
            geo_axes[2 + col].get_images()[0].get_array(),
        )


def test_forecast_panels_reject_absent_lead_times(synthetic_cube):
    _, forecasts = forecasts_from(synthetic_cube, 4, n_lead=3)
    with pytest.raises(ValueError, match="none of the lead times"):
        plot_forecast_panels(None, forecasts, lead_times_minutes=(45, 60))


def test_no_coastline_source_warns_once(synthetic_cube, tmp_path, monkeypatch, caplog):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setitem(cartopy.config, "data_dir", empty)
    monkeypatch.setitem(cartopy.config, "pre_existing_data_dir", empty)
    monkeypatch.setattr(coastlines, "SYSTEM_DATA_DIRS", ())
    observed, forecasts = forecasts_from(synthetic_cube, 4, n_lead=3)
    with caplog.at_level(logging.WARNING):
        fig = plot_forecast_panels(observed, forecasts, lead_times_minutes=(10, 20, 30))
        fig.savefig(tmp_path / "panels.png")
    warnings_logged = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings_logged) == 1
    assert "no coastline data" in warnings_logged[0].getMessage()
    assert "\n" not in warnings_logged[0].getMessage()
    assert all(not feature_artists(a) for a in fig.axes)


def _write_coastline(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    with shapefile.Writer(str(path), shapeType=shapefile.POLYLINE) as writer:
        writer.field("name", "C")
        for line in lines:
            writer.line([line])
            writer.record("coast")


def test_natural_earth_is_preferred_when_on_disk(tmp_path, monkeypatch):
    monkeypatch.setitem(cartopy.config, "data_dir", tmp_path)
    natural_earth = tmp_path / "shapefiles" / "natural_earth"
    _write_coastline(
        natural_earth / "physical" / "ne_10m_coastline.shp", [[(153, -27), (154, -28)]]
    )
    chosen = basemap("10m")
    assert chosen.description == "natural_earth 10m"
    assert len(chosen.features) == 1  # no borders file on disk: coastline only
    _write_coastline(
        natural_earth / "cultural" / "ne_10m_admin_0_boundary_lines_land.shp",
        [[(10, 50), (11, 51)]],
    )
    coastlines._basemap.cache_clear()
    assert len(basemap("10m").features) == 2


def test_gif_has_one_frame_per_lead_time(synthetic_cube, tmp_path):
    observed, forecasts = forecasts_from(synthetic_cube, 4, n_lead=4)
    path = animate_forecast(forecasts["perfect"], observed, path=tmp_path / "nowcast.gif")
    with Image.open(path) as gif:
        assert gif.n_frames == 4
        frames = []
        for i in range(gif.n_frames):
            gif.seek(i)
            frames.append(np.asarray(gif.convert("RGB"), dtype=np.int16))
    assert frames[0].std() > 20
    assert np.abs(frames[0] - frames[-1]).max() > 0  # the rain moves between lead times


def metrics_table() -> pd.DataFrame:
    rows = []
    for method, skill in [("persistence", 0.5), ("extrapolation", 0.7), ("convlstm", 0.8)]:
        for lead in (10, 20, 30, 60):
            for threshold in (0.5, 1.0, 5.0):
                value = skill * np.exp(-lead / 60) / threshold**0.2
                rows.append(
                    (method, lead, threshold, np.nan, "CSI", value, value - 0.05, value + 0.05)
                )
            for score, factor in (("MSE", 2.0), ("MAE", 1.0)):
                value = factor * (1 - skill) * lead / 10
                rows.append((method, lead, np.nan, np.nan, score, value, value * 0.9, value * 1.1))
    columns = ["method", "lead_time", "threshold", "scale", "score", "value", "ci_low", "ci_high"]
    return pd.DataFrame(rows, columns=columns)


def _line_colors(fig) -> dict[str, tuple]:
    ax = fig.axes[0]
    return {line.get_label(): matplotlib.colors.to_rgba(line.get_color()) for line in ax.lines}


def test_score_plots_render_with_confidence_bands(tmp_path):
    metrics = metrics_table()
    csi = plot_score_vs_lead_time(metrics, "CSI", path=tmp_path / "csi.png")
    panels = [a for a in csi.axes if a.get_visible() and a.lines]
    assert [a.get_title() for a in panels] == ["≥ 0.5 mm/h", "≥ 1 mm/h", "≥ 5 mm/h"]
    csi_rows = metrics[metrics["score"] == "CSI"]
    for ax, threshold in zip(panels, (0.5, 1.0, 5.0), strict=True):
        assert len(ax.lines) == 3
        bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
        assert len(bands) == 3
        for line in ax.lines:
            color = matplotlib.colors.to_rgb(line.get_color())
            band = next(b for b in bands if tuple(b.get_facecolor()[0][:3]) == color)
            y = band.get_paths()[0].vertices[:, 1]
            rows = csi_rows[
                (csi_rows["method"] == line.get_label()) & (csi_rows["threshold"] == threshold)
            ]
            assert y.max() == pytest.approx(rows["ci_high"].max())
            assert y.min() == pytest.approx(rows["ci_low"].min())
    first = panels[0]
    line = next(ln for ln in first.lines if ln.get_label() == "convlstm")
    expected = metrics.query("score == 'CSI' and method == 'convlstm' and threshold == 0.5")
    np.testing.assert_allclose(line.get_ydata(), expected.sort_values("lead_time")["value"])

    continuous = plot_continuous_scores(metrics, path=tmp_path / "continuous.png")
    assert [a.get_title() for a in continuous.axes if a.lines] == ["MSE", "MAE"]
    assert _line_colors(continuous) == _line_colors(csi)  # one colour per method everywhere
    assert (tmp_path / "csi.png").stat().st_size > 10_000
    assert png_pixels(tmp_path / "continuous.png").std() > 10


def test_score_plot_names_the_available_scores():
    with pytest.raises(ValueError, match="scores: CSI, MAE, MSE"):
        plot_score_vs_lead_time(metrics_table(), "FSS")


def test_method_styles_are_stable_and_distinct():
    styles = method_styles(["convlstm", "persistence", "cnn_lstm", "extrapolation"])
    assert styles == method_styles(["extrapolation", "cnn_lstm", "persistence", "convlstm"])
    assert len({s["color"] for s in styles.values()}) == 4
    assert styles["persistence"] == method_styles(["persistence"])["persistence"]
