"""Operational ``predict``: a nowcast from the newest (or a chosen) radar frames.

Inputs come from the source's cube or straight from the raw files through the catalog
(:mod:`nowcast.predict.frames`).

A forecast is a set of files in the output folder, ``<source>_<time>Z.nc`` and ``.png``, each
written atomically, and ``<source>_<time>Z.json`` written last: a manifest with the sha256 of
every file of the set. A consumer that finds the manifest finds a complete set; a rerun for the
same reference time removes the manifest first and replaces the set.

``members=N`` (``nowcast predict --members N``) forecasts the learned ensemble of a stochastic
model's checkpoint: the NetCDF holds the members (``realization`` first) and their exceedance
probabilities at 1, 5 and 10 mm/h, the map shows two members and the ensemble mean, and
``<source>_<time>Z_p10.png`` maps P(rain rate >= 10 mm/h). A request whose estimated memory
exceeds the available memory is refused before any work.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pandas as pd
import xarray as xr

from nowcast import storage
from nowcast.config import ConfigError
from nowcast.nowcasts.forecast import members as as_members
from nowcast.nowcasts.matching import MATCHING_SETTINGS
from nowcast.nowcasts.model import MEMBER_BATCH, SEED
from nowcast.nowcasts.probability import THRESHOLDS, exceedance_probability
from nowcast.nowcasts.runner import ForecastRun, forecast_window, model_method
from nowcast.nowcasts.variants import check_method_names, parse_variants
from nowcast.predict.frames import cube_from_files, cube_reference_time
from nowcast.predict.outputs import manifest_path, write_set
from nowcast.sources.catalog import Catalog, load_catalog
from nowcast.sources.cube import cube_path, open_cube
from nowcast.storage import exists, file_sha256
from nowcast.windows import cube_timestep, frame_step_note


@dataclass
class PredictResult:
    """What :func:`predict` wrote, and how long each of its stages took.

    Attributes
    ----------
    netcdf, map_png : str
        The files written.
    reference_time : str
        Time of the last input frame (ISO 8601).
    seconds : dict of str to float
        Wall seconds of each stage, in order: ``load_model`` (the checkpoint), ``read_inputs``,
        ``model`` (motion, transport and network), ``netcdf`` and ``map``. Together they are
        the work of a forecast; imports are not in any stage.
    note : str, optional
        How the model's timestep reads the source (:func:`nowcast.windows.frame_step_note`), if
        not 1:1.
    manifest : str, optional
        The manifest ``<stem>.json``, written last: ``reference_time``, ``source``, ``method``
        and ``files`` (name to sha256) of the set.
    probability_png : str, optional
        An ensemble's map of P(rain rate >= 10 mm/h), ``<stem>_p10.png``.
    published_at : float, optional
        ``time.monotonic()`` when the NetCDF was in place (before the maps were drawn).
    """

    netcdf: str
    map_png: str
    reference_time: str
    seconds: dict
    note: str | None = None
    manifest: str | None = None
    probability_png: str | None = None
    published_at: float | None = None

    @property
    def work_seconds(self) -> float:
        """Seconds of all the stages together."""
        return sum(self.seconds.values())

    def process_timings(self, startup: float, wall: float) -> dict:
        """The stage timings within the process that ran them (``nowcast predict``).

        Parameters
        ----------
        startup : float
            Seconds from the process start to the start of the work (interpreter, imports,
            configuration).
        wall : float
            Seconds from the process start to the end of the work.

        Returns
        -------
        dict
            ``stages_s`` (:attr:`seconds`), ``work_s`` (their sum), ``startup_s``, ``wall_s``
            and ``overhead_s`` (``wall_s - work_s``: start-up and whatever no stage covers).
        """
        work = self.work_seconds
        return {
            "stages_s": dict(self.seconds),
            "work_s": work,
            "startup_s": startup,
            "wall_s": wall,
            "overhead_s": wall - work,
        }

    def summary(self, timings: dict | None = None) -> str:
        """Lines for the user: files, stage timings and, given :meth:`process_timings`, the
        process's start-up and wall time."""
        timing = ", ".join(f"{k} {v:.2f} s" for k, v in self.seconds.items())
        note = f"note: {self.note}\n" if self.note else ""
        text = (
            f"{note}nowcast from {self.reference_time}\n  NetCDF: {self.netcdf}\n"
            f"  map: {self.map_png}\n"
            + (f"  probability map: {self.probability_png}\n" if self.probability_png else "")
            + (f"  manifest: {self.manifest}\n" if self.manifest else "")
            + f"  timing: {timing} (work {self.work_seconds:.2f} s)"
        )
        if timings is not None:
            text += (
                f"\n  process: start-up {timings['startup_s']:.2f} s (interpreter, imports), "
                f"wall {timings['wall_s']:.2f} s, overhead {timings['overhead_s']:.2f} s"
            )
        return text


def predict(
    source: str,
    checkpoint: str | Path,
    *,
    at: datetime | None = None,
    cube_dir: str = "data/cubes",
    from_files: bool = False,
    out_dir: str | Path = "runs/predict",
    catalog: Catalog | None = None,
    n_leadtimes: int | None = None,
    method: str = "model",
    forecast_methods: dict | None = None,
    members: int | None = None,
    member_batch: int = MEMBER_BATCH,
    seed: int = SEED,
    probability_matching: str | None = None,
) -> PredictResult:
    """Issue a nowcast with a trained model and write CF NetCDF plus a map PNG.

    Parameters
    ----------
    source : str
        Catalog source name.
    checkpoint : str or Path
        Checkpoint written by ``nowcast train``.
    at : datetime, optional
        Time of the last input frame; default the newest available frame (``--latest``).
    cube_dir : str
        Where the source's cube is (unless ``from_files``).
    from_files : bool
        Read the raw files through the catalog instead of the cube.
    out_dir : str or Path
        Output folder.
    catalog : Catalog, optional
    n_leadtimes : int, optional
        Lead times to write; default all the model predicts.
    method : str, optional
        ``model`` (default) or a variant of ``forecast_methods`` built on the model (blending,
        probability matching; :mod:`nowcast.nowcasts.variants`, as evaluate and export build
        it).
    forecast_methods : dict, optional
        An experiment's ``forecast_methods:`` section, where ``method`` is declared.
    members : int, optional
        Forecast this many members (>= 1) with the learned ensemble: the checkpoint must be a
        stochastic model's (a deterministic one gives only ``members=1``, its forecast as a
        one-member ensemble). By default a deterministic checkpoint gives its forecast and a
        stochastic one its default number of members (20).
    member_batch : int, optional
        Members drawn per forecaster batch, by default 4 (memory grows with it).
    seed : int, optional
        The run's seed; with the source and reference time it seeds the members.
    probability_matching : {"auto", "none", "cdf", "mean"}, optional
        The matching of the model's forecast (an ensemble's members pooled) to the last
        frame, by default the method's ``"auto"``
        (:class:`~nowcast.nowcasts.model.ModelNowcast`); not with a variant ``method``, which
        declares its own ``postprocess``.

    Returns
    -------
    PredictResult

    Raises
    ------
    ConfigError
        If ``members`` is below 1 or more than a deterministic checkpoint gives, or the
        ensemble will not fit in the available memory (the message gives the estimate).
    """
    predictor = Predictor.load(
        source,
        checkpoint,
        n_leadtimes=n_leadtimes,
        method=method,
        forecast_methods=forecast_methods,
        members=members,
        member_batch=member_batch,
        seed=seed,
        probability_matching=probability_matching,
    )
    step = predictor.step
    start = time.perf_counter()
    if from_files:
        catalog = catalog or load_catalog()
        note = _timestep_note(source, catalog[source].timestep, step)
        cube, reference = cube_from_files(catalog, source, at, predictor.n_input_frames, step)
    else:
        path = cube_path(cube_dir, source)
        if catalog is not None and source not in catalog.sources and not exists(path):
            catalog[source]  # no cube and no such source: say the source is unknown
        cube = open_cube(path)
        note = _timestep_note(source, cube_timestep(cube), step)
        reference = cube_reference_time(cube, at, predictor.n_input_frames, step)
    seconds = {"load_model": predictor.load_seconds, "read_inputs": time.perf_counter() - start}
    return predictor.issue(
        cube, reference, out_dir, seconds=seconds, note=note, from_files=from_files
    )


@dataclass
class Predictor:
    """A loaded model and how its nowcasts are made and written.

    :func:`predict` issues one nowcast with it; ``nowcast predict --watch``
    (:class:`nowcast.predict.watch.Watcher`) keeps one for every new frame, so the model is
    loaded once. Build it with :meth:`load`.
    """

    source: str
    checkpoint: str
    model: object
    run: ForecastRun
    name: str
    spec: object | None
    n_members: int | None
    member_batch: int
    seed: int
    load_seconds: float

    @classmethod
    def load(
        cls,
        source: str,
        checkpoint: str | Path,
        *,
        n_leadtimes: int | None = None,
        method: str = "model",
        forecast_methods: dict | None = None,
        members: int | None = None,
        member_batch: int = MEMBER_BATCH,
        seed: int = SEED,
        probability_matching: str | None = None,
    ) -> Predictor:
        """Load the checkpoint and check the request (the arguments of :func:`predict`)."""
        variants = parse_variants(forecast_methods)
        name = method.lower()
        check_method_names([name], variants, "predict --method")
        spec = variants.get(name)
        if name != "model" and (spec is None or spec.method != "model"):
            raise ConfigError(f"predict --method {method}: not the model or a variant built on it")
        if members is not None and int(members) < 1:
            raise ConfigError(f"predict --members {members}: give at least 1 member")
        if probability_matching not in (None, *MATCHING_SETTINGS):
            raise ConfigError(
                f"predict --probability-matching {probability_matching}: give one of "
                f"{', '.join(MATCHING_SETTINGS)}"
            )
        if probability_matching and spec:
            raise ConfigError(
                f"predict --probability-matching {probability_matching} with --method {method}: "
                "a variant declares its matching as its postprocess; use --method model"
            )
        start = time.perf_counter()
        model = model_method(str(checkpoint))
        load_seconds = time.perf_counter() - start
        n_members = _ensemble_members(model, checkpoint, members, name)
        kwargs = {}
        if n_members is not None and model.stochastic:
            kwargs = {"n_members": n_members, "member_batch": member_batch, "seed": seed}
        if probability_matching is not None:
            kwargs["probability_matching"] = probability_matching
        run = ForecastRun(
            methods=(name,),
            method_kwargs={name: kwargs} if kwargs else {},
            checkpoint=str(checkpoint),
            device=None,
            n_input_frames=model.n_input_frames,
            n_leadtimes=n_leadtimes or model.n_target_frames,
            timestep_minutes=int(model.timestep_minutes),
            variants={name: spec} if spec else {},
        )
        return cls(
            source, str(checkpoint), model, run, name, spec, n_members, member_batch, seed,
            load_seconds,
        )  # fmt: skip

    @property
    def step(self) -> int:
        """The model's timestep in minutes."""
        return int(self.model.timestep_minutes)

    @property
    def n_input_frames(self) -> int:
        """Input frames the model reads, at its timestep."""
        return int(self.model.n_input_frames)

    def _matching(self) -> str | None:
        """The matching the ensemble's members will get on this source (None: none)."""
        setting = self.run.method_kwargs.get(self.name, {}).get("probability_matching")
        return self.model.matching_for(self.source, setting or self.model.probability_matching)

    def manifest_path(self, out_dir: str | Path, reference) -> Path:
        """The manifest of the set of ``reference`` in ``out_dir``."""
        return manifest_path(out_dir, self.source, reference)

    def issue(
        self,
        cube: xr.Dataset,
        reference: pd.Timestamp,
        out_dir: str | Path,
        seconds: dict | None = None,
        note: str | None = None,
        from_files: bool = True,
    ) -> PredictResult:
        """Forecast from the frames of ``cube`` ending at ``reference`` and write the set.

        Raises
        ------
        ConfigError
            If the ensemble will not fit in the available memory (the estimate is named).
        """
        seconds = dict(seconds or {})
        if self.n_members is not None and self.model.stochastic:
            shape = (cube.sizes["y"], cube.sizes["x"])
            check_ensemble_memory(
                self.model,
                self.n_members,
                self.member_batch,
                self.run.n_leadtimes,
                shape,
                matched=self._matching() is not None,
            )
        window = forecast_window(cube, reference, self.run, observe=False)
        seconds["read_inputs"] = seconds.get("read_inputs", 0.0) + window.seconds["read"]
        seconds["model"] = window.seconds["forecast"]
        forecast, name, probability = window.forecasts[self.name], self.name, None
        if self.n_members is not None:
            # The learned ensemble (also the one-member forecast of a deterministic model).
            name = "ensemble"
            forecast = as_members(forecast)
            forecast.attrs["method"] = name
            probability = exceedance_probability(forecast, THRESHOLDS)
        config = {
            "checkpoint": self.checkpoint,
            "from_files": from_files,
            "probability_matching": forecast.attrs.get("probability_matching", "none"),
        }
        if self.n_members is not None:
            config.update(members=self.n_members, seed=self.seed)
        if self.spec:
            config["forecast_method"] = self.spec.model_dump(mode="json")
        provenance = {
            "source": self.source,
            "method": name,
            "checkpoint_sha256": _sha256(self.checkpoint),
            "config": config,
        }
        if "window_seed" in forecast.attrs:
            provenance["window_seed"] = forecast.attrs["window_seed"]
        written = write_set(forecast, probability, self.step, Path(out_dir), provenance, seconds)
        if config["probability_matching"] != "none":
            matched = f"forecast matched to the last frame ({config['probability_matching']})"
            note = f"{note}; {matched}" if note else matched
        return PredictResult(
            reference_time=written["reference"].isoformat(),
            seconds=seconds,
            note=note,
            published_at=written["published_at"],
            **{
                key: str(path) if path else None
                for key, path in written.items()
                if key not in ("reference", "published_at")
            },
        )


@functools.lru_cache(maxsize=4)
def _cached_sha256(path: str, modified: int) -> str:
    return file_sha256(path)


def _sha256(path: str) -> str:
    """The checkpoint's digest, computed once per file version (a watcher issues many)."""
    return _cached_sha256(path, Path(path).stat().st_mtime_ns)


def _ensemble_members(model, checkpoint, members: int | None, name: str) -> int | None:
    """Members the forecast will have: None for a deterministic forecast (as before).

    A stochastic checkpoint gives an ensemble (its default size without ``members``); a
    deterministic one gives one member at most.
    """
    if members is None and not model.stochastic:
        return None
    if members is not None and int(members) > 1 and not model.stochastic:
        raise ConfigError(
            f"predict --members {members}: {checkpoint} is a deterministic model "
            f"('{model.model_name}'); give --checkpoint of a stochastic model "
            "(stochastic_convlstm) or leave out --members"
        )
    if name != "model":
        raise ConfigError(
            f"predict --method {name}: variants are built on a deterministic forecast, not on "
            "an ensemble (--members, or a stochastic --checkpoint); an ensemble's members are "
            "matched with --probability-matching"
        )
    return int(members) if members is not None else int(model.n_members)


def available_memory_bytes() -> int | None:
    """Memory available to a new allocation (psutil, else Linux' MemAvailable), or None."""
    try:
        import psutil
    except ImportError:  # a development dependency: /proc/meminfo says the same on Linux
        try:
            with open("/proc/meminfo") as meminfo:
                fields = dict(line.split(":", 1) for line in meminfo)
            return int(fields["MemAvailable"].split()[0]) * 1024
        except (OSError, KeyError, ValueError):
            return None
    return int(psutil.virtual_memory().available)


def check_ensemble_memory(
    model,
    n_members: int,
    member_batch: int,
    n_leadtimes: int,
    shape: tuple[int, int],
    matched: bool = False,
) -> int:
    """Refuse an ensemble that will not fit in the available memory; return its estimate.

    The estimate is the model's (:meth:`~nowcast.nowcasts.model.ModelNowcast.ensemble_bytes`:
    the members in float32 and one member batch of network state and transport) plus the
    exceedance probabilities and pysteps' ``excprob`` float64 copy of one lead time's members;
    with ``matched`` (members matched to the last frame) also the matched copy of one lead's
    members and their pooled sort.

    Raises
    ------
    ConfigError
        One line with the estimated and the available bytes.
    """
    pixels = int(shape[0]) * int(shape[1])
    needed = model.ensemble_bytes(n_members, n_leadtimes, shape, member_batch)
    needed += len(THRESHOLDS) * n_leadtimes * pixels * 4 + n_members * pixels * 10
    if matched:
        needed += n_members * pixels * (4 + 24)
    available = available_memory_bytes()
    if available is not None and needed > available:
        raise ConfigError(
            f"predict --members {n_members}: the ensemble needs an estimated {needed} bytes "
            f"({storage.format_bytes(needed)}: {n_members} members x {n_leadtimes} lead times x "
            f"{shape[0]} x {shape[1]} float32 and a batch of {member_batch} members' network "
            f"states) but {storage.format_bytes(available)} of memory is available; ask for "
            "fewer members or a smaller --member-batch"
        )
    return needed


def _timestep_note(source: str, source_step: int, model_step: int) -> str | None:
    # nowcast.windows.frames_per_model_step's rule: every k-th source frame counted back.
    return frame_step_note(source, source_step, model_step)


__all__ = ["Predictor", "PredictResult", "predict"]
