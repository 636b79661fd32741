"""A nowcast's set of files: the NetCDF, the map PNG(s) and, written last, the manifest.

A consumer that finds ``<source>_<time>Z.json`` finds a complete set: the manifest holds the
sha256 of every file of the set and is written after all of them (each atomically). A rerun for
the same reference time removes the manifest first and replaces the set. The NetCDF is written
before the maps are drawn, so it is published first.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import xarray as xr

from nowcast import storage
from nowcast.nowcasts.forecast import ensemble_mean, ensemble_size, is_ensemble
from nowcast.nowcasts.netcdf import netcdf_bytes, write_forecast_netcdf
from nowcast.storage import atomic_write_file, file_sha256, remove, write_text
from nowcast.visualization.maps import plot_forecast_panels

#: Free space asked for the map PNG(s) besides the NetCDF (a map is a few hundred KiB).
PNG_ALLOWANCE_BYTES = 4 * 2**20
#: Resolution of the map, as :func:`nowcast.visualization.maps.plot_forecast_panels` saves it.
MAP_DPI = 110
#: The threshold (mm/h) of an ensemble's probability map.
MAP_THRESHOLD = 10.0


def set_stem(source: str, reference) -> str:
    """``<source>_<YYYYmmddTHHMM>Z``, the name every file of a set starts with."""
    return f"{source}_{pd.Timestamp(reference):%Y%m%dT%H%M}Z"


def manifest_path(out_dir: str | Path, source: str, reference) -> Path:
    """The manifest of the set of ``reference`` in ``out_dir``."""
    return Path(out_dir) / f"{set_stem(source, reference)}.json"


def manifest_reference(manifest: Path) -> pd.Timestamp | None:
    """The reference time a manifest's name gives, or None for another file."""
    try:
        return pd.Timestamp(pd.to_datetime(manifest.stem.rsplit("_", 1)[-1], format="%Y%m%dT%H%MZ"))
    except (ValueError, TypeError):
        return None


def set_files(manifest: Path) -> list[Path]:
    """Every file of a set, the manifest first: removed in this order, a set is never
    mistaken for complete while it is being deleted."""
    try:
        names = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError):
        names = {}
    return [manifest] + [manifest.parent / name for name in names]


def write_set(
    forecast: xr.DataArray,
    probability: xr.DataArray | None,
    step: int,
    out_dir: Path,
    provenance: dict,
    seconds: dict,
) -> dict:
    """Write a forecast's set: the NetCDF, the map(s), then the manifest.

    Returns
    -------
    dict
        The paths ``netcdf``, ``map_png``, ``probability_png`` (None without probabilities)
        and ``manifest``, the ``reference`` time and ``published_at``, the ``time.monotonic()``
        at which the NetCDF was in place; ``seconds`` gains ``netcdf`` and ``map``.
    """
    source, name = provenance["source"], provenance["method"]
    reference = pd.Timestamp(forecast["forecast_reference_time"].values)
    stem = set_stem(source, reference)
    manifest = out_dir / f"{stem}.json"
    n_maps = 1 if probability is None else 2
    storage.check_free_space(
        out_dir, netcdf_bytes(forecast) + n_maps * PNG_ALLOWANCE_BYTES, f"forecast files {stem}.*"
    )
    remove(manifest)  # the set is incomplete until its new manifest is written
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    netcdf = out_dir / f"{stem}.nc"
    write_forecast_netcdf(forecast, netcdf, provenance=provenance, probabilities=probability)
    seconds["netcdf"] = time.perf_counter() - start
    published_at = time.monotonic()
    start = time.perf_counter()
    png = out_dir / f"{stem}.png"
    _write_map(forecast, name, step, png)
    files = [netcdf, png]
    if probability is not None:
        files.append(out_dir / f"{stem}_p{MAP_THRESHOLD:g}.png")
        _write_probability_map(probability, MAP_THRESHOLD, step, files[-1])
    seconds["map"] = time.perf_counter() - start
    _write_manifest(manifest, reference, source, name, files)
    return {
        "netcdf": netcdf,
        "map_png": png,
        "probability_png": files[2] if probability is not None else None,
        "manifest": manifest,
        "reference": reference,
        "published_at": published_at,
    }


def _map_leads(forecast: xr.DataArray, step: int) -> list[int]:
    """+1, +3 and +6 steps, those the forecast has (minutes)."""
    return [step * k for k in (1, 3, 6) if k <= forecast.sizes["lead_time"]]


def _write_map(forecast: xr.DataArray, name: str, step: int, path: Path) -> None:
    """The map panels at :func:`_map_leads`, written atomically: one row for a deterministic
    forecast; for an ensemble the first two members and the ensemble mean."""
    rows = {name: forecast}
    if is_ensemble(forecast):
        shown = range(min(2, ensemble_size(forecast)))
        rows = {f"member {k}": forecast.isel(realization=k) for k in shown}
        rows["ensemble mean"] = ensemble_mean(forecast)
    figure = plot_forecast_panels(None, rows, _map_leads(forecast, step))
    _save_figure(figure, path)


def _write_probability_map(
    probability: xr.DataArray, threshold: float, step: int, path: Path
) -> None:
    """Maps of P(rain rate >= ``threshold``) at :func:`_map_leads`, written atomically."""
    # Only an ensemble nowcast draws it: its module's imports stay off predict's start-up.
    from nowcast.visualization.ensemble_plots import plot_probability_panels

    field = probability.sel(threshold=threshold)
    _save_figure(plot_probability_panels(field, _map_leads(field, step), threshold), path)


def _save_figure(figure, path: Path) -> None:
    try:
        atomic_write_file(path, lambda tmp: figure.savefig(tmp, dpi=MAP_DPI, format="png"))
    finally:
        _close(figure)


def _write_manifest(
    path: Path, reference: pd.Timestamp, source: str, method: str, files: list[Path]
) -> None:
    """``<stem>.json``: the set's files and their sha256, written after all of them."""
    record = {
        "reference_time": reference.isoformat(),
        "source": source,
        "method": method,
        "files": {file.name: file_sha256(file) for file in files},
    }
    write_text(path, json.dumps(record, indent=2) + "\n")


def _close(figure) -> None:
    import matplotlib.pyplot as plt

    plt.close(figure)
