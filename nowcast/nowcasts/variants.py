"""Configured forecast methods: a registered method, blended with another, probability-matched.

A *variant* is a named forecast method that an experiment config declares under
``forecast_methods:``; evaluate, export and predict build it with the same functions here, so a
postprocessing step is part of the method's configuration (and of every report and NetCDF that
names it), never hidden in a checkpoint::

    forecast_methods:
      model_cdf:                      # the model, CDF-matched to the last observed frame
        method: model
        postprocess: {method: cdf, target: last_input}
      model_sprog:                    # model and S-PROG mixed per lead time, then matched
        method: model
        blend: {method: sprog, weights: [0.9, 0.8, 0.6, 0.5, 0.4, 0.3]}
        postprocess: {method: cdf}

Steps, in this order:

1. ``method``: the base forecast (a registered method, see :mod:`nowcast.nowcasts.interface`).
2. ``blend``: ``w_k * base + (1 - w_k) * other`` at lead ``k`` (the last weight repeats for
   longer forecasts); where the other method has no data the base is kept.
3. ``postprocess``: probability matching per lead against a target field. ``cdf`` is pysteps'
   ``nonparam_match_empirical_cdf`` (the forecast keeps its ranks and takes the target's
   values, so its wet area and intensities are those of the target); ``mean`` keeps the
   target's wet-area fraction and scales the forecast's conditional mean to the target's, as
   pysteps S-PROG's ``probmatching_method="mean"`` does. The target of every lead is the last
   observed frame (``last_input``), or the extrapolation forecast of that lead
   (``extrapolation``: the observed distribution restricted to the pixels LK can still see).
   ``isotonic`` applies the per-lead curves of a calibration file written by
   ``nowcast calibrate`` (``file:``; only for the model, whose checkpoint the file must have
   been fitted on, see :mod:`nowcast.evaluate.calibration`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import numpy as np
import xarray as xr
from pydantic import Field, ValidationError, field_validator, model_validator

from nowcast.config import ConfigError, StrictModel, format_validation_error
from nowcast.nowcasts.interface import registered_methods
from nowcast.nowcasts.isotonic import apply_calibration, load_calibration
from nowcast.nowcasts.matching import probability_match


class Blend(StrictModel):
    """``blend:`` mix the base forecast with another registered method, per lead time."""

    method: str = Field(description="the other registered method, e.g. sprog")
    weights: list[float] = Field(
        min_length=1, description="weight of the base method per lead; the last one repeats"
    )

    @field_validator("weights")
    @classmethod
    def _unit_interval(cls, value: list[float]) -> list[float]:
        if any(not 0.0 <= w <= 1.0 for w in value):
            raise ValueError(f"weights must lie in [0, 1], got {value}")
        return value


class Postprocess(StrictModel):
    """``postprocess:`` probability matching of every lead time, or an isotonic calibration."""

    method: Literal["cdf", "mean", "isotonic"] = Field(
        description="cdf or mean probability matching, or isotonic (a calibration file)"
    )
    target: Literal["last_input", "extrapolation"] = Field(
        "last_input", description="distribution matched at every lead time (cdf, mean)"
    )
    file: str | None = Field(
        None, description="isotonic: the calibration file written by `nowcast calibrate`"
    )

    @model_validator(mode="after")
    def _file_for_isotonic(self) -> Postprocess:
        if (self.method == "isotonic") != (self.file is not None):
            raise ValueError("'file' names the calibration of method isotonic, and only that")
        return self


class MethodSpec(StrictModel):
    """One entry of ``forecast_methods:``."""

    method: str = Field(description="registered base method, e.g. model")
    blend: Blend | None = None
    postprocess: Postprocess | None = None

    @model_validator(mode="after")
    def _isotonic_calibrates_the_model(self) -> MethodSpec:
        isotonic = self.postprocess is not None and self.postprocess.method == "isotonic"
        if isotonic and (self.method != "model" or self.blend is not None):
            raise ValueError("isotonic calibration applies to method 'model' without a blend")
        return self

    def bases(self) -> list[str]:
        """Registered methods this variant needs, base first."""
        needed = [self.method]
        if self.blend is not None:
            needed.append(self.blend.method)
        if self.postprocess is not None and self.postprocess.target == "extrapolation":
            needed.append("extrapolation")
        return list(dict.fromkeys(needed))


def parse_variants(raw: Mapping | None, where: str = "forecast_methods") -> dict[str, MethodSpec]:
    """Validate a ``forecast_methods:`` mapping of name to :class:`MethodSpec`.

    Raises
    ------
    ConfigError
        Naming the variant and field: an unknown key, a method that is not registered, or a
        variant that shadows a registered method's name.
    """
    registered = registered_methods()
    variants = {}
    for name, spec in (raw or {}).items():
        key = str(name).lower()
        if key in registered:
            raise ConfigError(f"{where}: '{name}' is a registered method; choose another name")
        try:
            parsed = MethodSpec.model_validate(spec)
        except ValidationError as err:
            raise ConfigError(format_validation_error(err, f"{where}.{name}")) from None
        for base in parsed.bases():
            if base.lower() not in registered:
                raise ConfigError(
                    f"{where}.{name}: unknown method '{base}'; registered: {', '.join(registered)}"
                )
        variants[key] = parsed
    return variants


def check_method_names(names, variants: Mapping[str, MethodSpec], where: str) -> None:
    """Raise ConfigError unless every name is registered or a declared variant."""
    known = set(registered_methods()) | set(variants)
    for name in names:
        if name not in known:
            raise ConfigError(
                f"{where}: unknown forecast method '{name}'; registered: "
                + ", ".join(registered_methods())
                + (f"; forecast_methods: {', '.join(variants)}" if variants else "")
            )


def base_methods(names, variants: Mapping[str, MethodSpec]) -> list[str]:
    """The registered methods to run for ``names`` (variants replaced by their bases), in order."""
    needed = []
    for name in names:
        needed += variants[name].bases() if name in variants else [name]
    return list(dict.fromkeys(needed))


def blend_values(values: np.ndarray, other: np.ndarray, weights) -> np.ndarray:
    """``w_k * values + (1 - w_k) * other`` per lead (axis 0); ``values`` where ``other`` has no
    data."""
    n_leads = values.shape[0]
    weights = np.asarray(list(weights) + [weights[-1]] * n_leads, dtype=np.float32)[:n_leads]
    weights = weights.reshape((n_leads,) + (1,) * (values.ndim - 1))
    mixed = weights * values + (1.0 - weights) * other
    return np.where(np.isfinite(other), mixed, values).astype(np.float32)


def apply_variant(
    name: str,
    spec: MethodSpec,
    forecasts: Mapping[str, xr.DataArray],
    inputs: xr.DataArray,
) -> xr.DataArray:
    """The variant's forecast from its bases' forecasts of the same inputs.

    Parameters
    ----------
    name : str
        Variant name, recorded in the forecast's ``method`` attribute.
    spec : MethodSpec
        The variant.
    forecasts : mapping of str to xarray.DataArray
        Forecasts of (at least) ``spec.bases()`` from ``inputs``.
    inputs : xarray.DataArray
        The input frames (the ``last_input`` target is the last one).

    Returns
    -------
    xarray.DataArray
        Forecast (lead_time, y, x) in mm/h, same grid and no-data area as the base forecast.
    """
    dims = forecasts[spec.method].dims
    # Lead time first, so that the per-lead steps index axis 0 whatever other dimensions the
    # base forecast has (another method's forecast is broadcast to them).
    base = forecasts[spec.method].transpose("lead_time", ...)
    values = np.asarray(base.values, dtype=np.float32)
    if spec.blend is not None:
        other = _like(forecasts[spec.blend.method], base)
        values = blend_values(values, other, spec.blend.weights)
    if spec.postprocess is not None and spec.postprocess.method == "isotonic":
        curves = _calibration_curves(spec.postprocess.file, base.attrs.get("model_checkpoint"))
        values = apply_calibration(values, curves)
    elif spec.postprocess is not None:
        if spec.postprocess.target == "extrapolation":
            target = _like(forecasts["extrapolation"], base)
        else:
            target = np.asarray(inputs.values[-1], dtype=np.float32)
        values = probability_match(values, target, spec.postprocess.method)
    values = np.where(np.isfinite(base.values), values, np.nan).astype(np.float32)
    result = base.copy(data=values).transpose(*dims)
    result.attrs["method"] = name
    result.attrs["method_config"] = spec.model_dump_json(exclude_none=True)
    return result


def _like(forecast: xr.DataArray, base: xr.DataArray) -> np.ndarray:
    """``forecast``'s float32 values laid out as ``base``: its dimensions in ``base``'s order,
    and the dimensions it lacks repeated (positionally: no alignment of coordinates)."""
    shared = [dim for dim in base.dims if dim in forecast.dims]
    values = np.asarray(forecast.transpose(*shared).values, dtype=np.float32)
    for axis, dim in enumerate(base.dims):
        if dim not in forecast.dims:
            values = np.expand_dims(values, axis)
    return np.broadcast_to(values, base.shape)


@functools.lru_cache(maxsize=8)
def _cached_curves(path: str, checkpoint: str, stamp: tuple) -> tuple:
    return tuple(load_calibration(path, checkpoint))


def _calibration_curves(path: str, checkpoint: str | None) -> list[dict]:
    """The curves of a calibration file, checked once per file and checkpoint version."""
    if checkpoint is None:
        raise ConfigError(f"isotonic calibration {path}: the base forecast names no checkpoint")
    stamp = tuple(Path(p).stat().st_mtime_ns if Path(p).exists() else 0 for p in (path, checkpoint))
    return list(_cached_curves(str(path), str(checkpoint), stamp))


def forecast_variants(
    names, variants: Mapping[str, MethodSpec], forecasts: Mapping[str, xr.DataArray], inputs
) -> dict[str, xr.DataArray]:
    """``names`` to forecasts: registered ones from ``forecasts``, variants built from them."""
    return {
        name: apply_variant(name, variants[name], forecasts, inputs)
        if name in variants
        else forecasts[name]
        for name in names
    }
