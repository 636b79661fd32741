"""Normalization of rain rate for the networks, and its exact inverse.

Each method is fitted once on the training split (:meth:`fit` returns a JSON-serialisable
``params`` dict that the patch store records) and then applied with :meth:`forward` and undone
with :meth:`inverse`. ``forward`` and ``inverse`` take NumPy arrays or PyTorch tensors and return
the same kind, so the patch builder works on NumPy and the trainer inverts predictions on torch.

NaN (no data) passes through ``forward`` unchanged; the patch builder records it in a mask and
writes 0 in its place.

A store's normalization is one :class:`Normalization` record: the method, its fitted
``params`` and what it was ``fitted_on``; its :meth:`~Normalization.forward` and
:meth:`~Normalization.inverse` apply the method with those params.

Methods (``get_method(name)``):

``"log1p"``
    ``x = log1p(R) / scale`` with ``scale`` a high percentile (default 99.9) of ``log1p(R)`` over
    the training rain rates, so that nearly all training values lie in [0, 1].
    ``inverse`` is ``expm1(x * scale)`` clipped at 0 (a network may predict below 0).
``"dbz"``
    Reflectivity as in Shi et al. (2015): ``dBZ = 10 log10(a R^b)`` (Marshall-Palmer
    ``a = 200, b = 1.6``), clipped to ``[dbz_min, dbz_max]`` and scaled to [0, 1]; ``R = 0`` maps
    to 0. Rain rates at or below the clip floor (``dbz_min``; 0 dBZ is 0.036 mm/h) map to 0 and
    come back as 0: the inverse is exact for ``R`` in ``(R(dbz_min), R(dbz_max)]`` and for 0.
``"none"``
    Identity.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np


def _torch():
    """The torch module if it is imported: a tensor argument implies it is, and Dask workers
    that only normalize NumPy arrays never pay for importing torch."""
    return sys.modules.get("torch")


def _is_tensor(values) -> bool:
    torch = _torch()
    return torch is not None and isinstance(values, torch.Tensor)


def _where(condition, a, b):
    """``numpy.where`` / ``torch.where`` with scalar branches."""
    if _is_tensor(condition):
        return _torch().where(condition, a, b)
    return np.where(condition, a, b)


def _finite_values(train_rain_rate) -> np.ndarray:
    values = np.asarray(train_rain_rate, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    if values.size == 0:
        raise ValueError("no valid (non-NaN) training rain rates to fit the normalization on")
    return values


class Log1p:
    """``log1p(R) / scale``; see the module docstring."""

    name = "log1p"

    def fit(self, train_rain_rate, percentile: float = 99.9) -> dict:
        """Fit ``scale`` on training rain rates (mm/h, NaN ignored).

        Parameters
        ----------
        train_rain_rate : array_like
            Rain rates of the training split, any shape.
        percentile : float
            Percentile of ``log1p(R)`` used as the scale.

        Returns
        -------
        dict
            ``{"scale": float, "percentile": float}``.
        """
        values = _finite_values(train_rain_rate)  # a fresh float64 copy: safe to overwrite
        # In place: the same numbers without three more copies of the (up to 20 M) values.
        np.clip(values, 0.0, None, out=values)
        np.log1p(values, out=values)
        scale = float(np.percentile(values, percentile, overwrite_input=True))
        if scale <= 0.0:
            raise ValueError(
                f"log1p normalization: the {percentile}th percentile of the training rain rate "
                "is 0 (the training split is dry); lower 'percentile' or use more rainy data"
            )
        return {"scale": scale, "percentile": float(percentile)}

    def forward(self, rain_rate, params: dict):
        """Normalized values from rain rate (mm/h)."""
        if _is_tensor(rain_rate):
            return _torch().log1p(rain_rate) / params["scale"]
        return np.log1p(rain_rate) / params["scale"]

    def inverse(self, values, params: dict):
        """Rain rate (mm/h, >= 0) from normalized values."""
        if _is_tensor(values):
            torch = _torch()
            return torch.clamp(torch.expm1(values * params["scale"]), min=0.0)
        return np.clip(np.expm1(values * params["scale"]), 0.0, None)


class DBZ:
    """Reflectivity scaled to [0, 1] (Shi et al. 2015); see the module docstring."""

    name = "dbz"

    def fit(
        self,
        train_rain_rate=None,
        a: float = 200.0,
        b: float = 1.6,
        dbz_min: float = 0.0,
        dbz_max: float = 70.0,
    ) -> dict:
        """Fixed parameters (the training data is not needed: the scaling is physical).

        Returns
        -------
        dict
            ``{"a", "b", "dbz_min", "dbz_max"}``.
        """
        if dbz_max <= dbz_min:
            raise ValueError(f"dbz normalization: dbz_max ({dbz_max}) must exceed dbz_min")
        return {"a": float(a), "b": float(b), "dbz_min": float(dbz_min), "dbz_max": float(dbz_max)}

    def forward(self, rain_rate, params: dict):
        """Scaled reflectivity from rain rate (mm/h); 0 at and below the clip floor."""
        lo, hi = params["dbz_min"], params["dbz_max"]
        positive = rain_rate > 0
        # log10 of 1 where R <= 0 keeps the unused branch finite (no warnings, no NaN).
        safe = _where(positive, rain_rate, 1.0)
        if _is_tensor(rain_rate):
            torch = _torch()
            dbz = 10.0 * (math.log10(params["a"]) + params["b"] * torch.log10(safe))
            scaled = (torch.clamp(dbz, lo, hi) - lo) / (hi - lo)
            return torch.where(
                torch.isnan(rain_rate), rain_rate, torch.where(positive, scaled, 0.0)
            )
        # a R^b in logs: no underflow for tiny R.
        dbz = 10.0 * (math.log10(params["a"]) + params["b"] * np.log10(safe))
        scaled = (np.clip(dbz, lo, hi) - lo) / (hi - lo)
        return np.where(np.isnan(rain_rate), rain_rate, np.where(positive, scaled, 0.0))

    def inverse(self, values, params: dict):
        """Rain rate (mm/h) from scaled reflectivity; values at or below 0 give 0."""
        lo, hi = params["dbz_min"], params["dbz_max"]
        dbz = values * (hi - lo) + lo
        if _is_tensor(values):
            rain_rate = (10.0 ** (dbz / 10.0) / params["a"]) ** (1.0 / params["b"])
        else:
            rain_rate = np.power(np.power(10.0, dbz / 10.0) / params["a"], 1.0 / params["b"])
        return _where(values > 0, rain_rate, 0.0)


class Identity:
    """No normalization."""

    name = "none"

    def fit(self, train_rain_rate=None) -> dict:
        return {}

    def forward(self, rain_rate, params: dict):
        return rain_rate

    def inverse(self, values, params: dict):
        return values


_methods = {"log1p": Log1p, "dbz": DBZ, "none": Identity}


def get_method(name: str):
    """Return the normalization method called ``name``.

    Parameters
    ----------
    name : str
        One of ``"log1p"``, ``"dbz"``, ``"none"``.

    Returns
    -------
    object
        With ``fit(train_rain_rate, **kwargs) -> params``, ``forward(rain_rate, params)`` and
        ``inverse(values, params)``.
    """
    key = str(name).lower()
    if key not in _methods:
        known = ", ".join(sorted(_methods))
        raise ValueError(f"unknown normalization method '{name}'; registered: {known}")
    return _methods[key]()


@dataclasses.dataclass(frozen=True)
class Normalization:
    """A fitted normalization: the method, its parameters and the data it was fitted on.

    Stored as the JSON object ``{"method", "params", "fitted_on"}`` (the patch store's
    ``normalization`` attribute, a checkpoint's ``normalization`` key).

    Parameters
    ----------
    method : str
        Registered method name (:func:`get_method`).
    params : dict
        What the method's ``fit`` returned.
    fitted_on : dict, optional
        Where it was fitted (``{"split", "sources"}``); None when unknown.
    """

    method: str
    params: dict
    fitted_on: dict | None = None

    @classmethod
    def from_dict(cls, record: Mapping[str, Any] | str) -> Normalization:
        """The record from its stored form (a mapping or its JSON text)."""
        if isinstance(record, str):
            record = json.loads(record)
        return cls(str(record["method"]), dict(record["params"]), record.get("fitted_on"))

    def to_dict(self) -> dict:
        """The stored form; ``fitted_on`` is left out when unknown."""
        record = {"method": self.method, "params": self.params}
        if self.fitted_on is not None:
            record["fitted_on"] = self.fitted_on
        return record

    @property
    def transform(self):
        """The registered method object (:func:`get_method`)."""
        return get_method(self.method)

    def forward(self, rain_rate):
        """Normalized values from rain rate (mm/h); NumPy or torch in, the same kind out."""
        return self.transform.forward(rain_rate, self.params)

    def inverse(self, values):
        """Rain rate (mm/h) from normalized values; NumPy or torch in, the same kind out."""
        return self.transform.inverse(values, self.params)
