"""Windows: the runs of consecutive frames that one forecast or one training sample uses.

This module is the one owner of window logic; patches, evaluate, export, calibration and
predict call it instead of re-deriving it:

- the **timeline** of a cube: its frames at the source timestep, or only the clock-aligned ones
  at a common ``resample_minutes``, with their validity and **segment**;
- **split labels**: contiguous train / val / test blocks from fractions or explicit time ranges,
  and the buffer carved between splits;
- **listing**: a window is ``n_input + n_target`` consecutive frames of one timeline that are all
  valid, all in one split and all in one segment, exactly one timestep apart;
- **thinning** of the windows that are evaluated or exported;
- **valid-time arithmetic**: input times and valid times from a reference time (the last input
  frame).

Segments come from ingest: a gap longer than the source's ``max_gap_minutes`` is not stored in the
cube, which records a ``segment`` number per frame instead. A cube without a ``segment``
variable is read as one segment. No window crosses a segment boundary.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import pandas as pd
import xarray as xr

from nowcast.config import ConfigError
from nowcast.sources.cube import cube_segments

SPLITS = ("train", "val", "test")
# A buffer is carved from the split that comes later in this order.
SPLIT_PRIORITY = ("test", "val", "train")


# --------------------------------------------------------------------------------------------
# valid-time arithmetic


@dataclass(frozen=True)
class FrameSpec:
    """The frames of one window as a model sees them: inputs, targets and their timestep.

    Stored as the attributes ``n_input_frames``, ``n_target_frames`` and ``timestep_minutes``
    (patch store and checkpoint).

    Parameters
    ----------
    n_input : int
        Input frames, the last one at the reference time.
    n_target : int
        Target frames (lead times).
    timestep : int
        Minutes between consecutive frames.
    """

    n_input: int
    n_target: int
    timestep: int

    @classmethod
    def from_attrs(cls, attrs) -> FrameSpec:
        """The spec from a mapping with the stored names (store attributes, checkpoint)."""
        return cls(
            int(attrs["n_input_frames"]),
            int(attrs["n_target_frames"]),
            int(attrs["timestep_minutes"]),
        )

    def to_attrs(self) -> dict[str, int]:
        """The stored names and values."""
        return {
            "n_input_frames": int(self.n_input),
            "n_target_frames": int(self.n_target),
            "timestep_minutes": int(self.timestep),
        }


def input_offsets(n_input: int, timestep_minutes: int) -> np.ndarray:
    """Offsets of the input frames from the reference time: ``-(n_input-1)*step, ..., 0``."""
    step = np.timedelta64(int(timestep_minutes), "m").astype("timedelta64[ns]")
    return (np.arange(n_input) - (n_input - 1)) * step


def lead_offsets(n_leads: int, timestep_minutes: int) -> np.ndarray:
    """Lead times of the forecast frames: ``step, 2*step, ..., n_leads*step``."""
    step = np.timedelta64(int(timestep_minutes), "m").astype("timedelta64[ns]")
    return np.arange(1, n_leads + 1) * step


def input_times(reference_time, n_input: int, timestep_minutes: int) -> np.ndarray:
    """Valid times (datetime64[ns]) of the input frames ending at ``reference_time``."""
    return np.datetime64(pd.Timestamp(reference_time), "ns") + input_offsets(
        n_input, timestep_minutes
    )


def valid_times(reference_time, n_leads: int, timestep_minutes: int) -> np.ndarray:
    """Valid times (datetime64[ns]) of the forecast frames after ``reference_time``."""
    return np.datetime64(pd.Timestamp(reference_time), "ns") + lead_offsets(
        n_leads, timestep_minutes
    )


def reference_times(start_times, n_input: int, timestep_minutes: int) -> np.ndarray:
    """Reference times (last input frame) of windows that start at ``start_times``."""
    step = np.timedelta64(int(timestep_minutes), "m").astype("timedelta64[ns]")
    return np.asarray(start_times, dtype="datetime64[ns]") + (n_input - 1) * step


def default_frame_counts(timestep_minutes: int) -> tuple[int, int]:
    """One hour of input and one hour of target frames (10 min -> 6/6, 5 min -> 12/12)."""
    if 60 % timestep_minutes:
        raise ConfigError(
            f"no default n_input_frames/n_target_frames for a {timestep_minutes}-minute "
            "timestep; set them in the patches section"
        )
    n = 60 // timestep_minutes
    return n, n


# --------------------------------------------------------------------------------------------
# the timestep rule: a model's step against a source's step


def frames_per_model_step(model_step: float, source_step: float, source: str = "the inputs") -> int:
    """Source frames per model step: a model takes every k-th source frame, or refuses.

    This is the one place of the rule. A model trained at ``model_step`` minutes reads a source
    whose frames are ``source_step`` minutes apart when ``model_step = k * source_step`` for a
    whole k >= 1: it takes every k-th frame counted back from the reference time (inputs t,
    t - model_step, ...) and forecasts lead times t + model_step, ... A 5-minute source for a
    10-minute model gives k = 2; forecasts can still start at every source frame.

    Parameters
    ----------
    model_step, source_step : float
        Minutes between the model's frames and between the source's frames.
    source : str, optional
        Name of the source, for the error message.

    Returns
    -------
    int
        k, the step in source frames (1 when the steps are equal).

    Raises
    ------
    ConfigError
        If the source step is longer than the model's or does not divide it (e.g. 6 min for a
        10-minute model); the message names both steps and the source.
    """
    ratio = float(model_step) / float(source_step) if source_step else 0.0
    k = int(round(ratio))
    if k < 1 or not np.isclose(ratio, k):
        raise ConfigError(
            f"{source}: {float(source_step):g}-minute frames do not fit a model trained on "
            f"{float(model_step):g}-minute frames (the model's step must be a whole multiple "
            "of the source's)"
        )
    return k


def frame_step_note(source: str, source_step: float, model_step: float) -> str | None:
    """One line saying how :func:`frames_per_model_step`'s rule reads a source (None if k = 1)."""
    k = frames_per_model_step(model_step, source_step, source)
    if k == 1:
        return None
    step = f"{float(model_step):g}"
    nth = {2: "2nd", 3: "3rd"}.get(k, f"{k}th")
    return (
        f"{source}: {float(source_step):g}-minute frames, the {step}-minute model takes every "
        f"{nth} frame counted back from the reference time t (inputs t, t-{step} min, ...; "
        f"lead times t+{step} min, ...)"
    )


def counted_back(n_available: int, n_frames: int, frame_step: int) -> np.ndarray:
    """Indices of ``n_frames`` frames, every ``frame_step``-th counted back from the last available.

    Raises
    ------
    ValueError
        If fewer than ``(n_frames - 1) * frame_step + 1`` frames are available.
    """
    needed = (n_frames - 1) * frame_step + 1
    if n_available < needed:
        raise ValueError(
            f"{n_frames} frames every {frame_step} need {needed} input frames, got {n_available}"
        )
    return np.arange(n_available - needed, n_available, frame_step)


# --------------------------------------------------------------------------------------------
# timeline of a cube


def cube_timestep(cube: xr.Dataset) -> int:
    """Minutes between consecutive frames of a cube (attribute, else inferred from ``time``)."""
    step = int(cube.attrs.get("timestep_minutes", 0))
    if step:
        return step
    times = cube["time"].values
    if len(times) < 2:
        raise ConfigError("cannot infer the timestep of a one-frame cube")
    return int(np.min(np.diff(times)) // np.timedelta64(1, "m"))


def aligned_frames(times: np.ndarray, source_step: int, resample_minutes: int | None) -> np.ndarray:
    """Cube indices of the frames kept at ``resample_minutes`` (all frames without it).

    Kept frames are aligned to the clock (minutes since midnight divisible by the step), so that
    sources with different timesteps are resampled to the same times, and no frame is
    interpolated.
    """
    if resample_minutes is None or resample_minutes == source_step:
        return np.arange(len(times))
    if resample_minutes % source_step:
        raise ConfigError(
            f"resample_minutes={resample_minutes} is not a multiple of the source timestep "
            f"({source_step} min)"
        )
    minutes = (times - times.astype("datetime64[D]")) // np.timedelta64(1, "m")
    return np.flatnonzero(minutes % resample_minutes == 0)


@dataclass
class Timeline:
    """The frames of one cube at a (possibly resampled) timestep.

    Attributes
    ----------
    source, cube_path : str
        Catalog source and the path of its cube.
    cube_step : int
        Minutes between cube frames.
    step : int
        Cube frames per timeline step (``timestep = cube_step * step``).
    cube_index : numpy.ndarray
        Cube time index of each timeline frame.
    times : numpy.ndarray
        datetime64[ns] valid time of each timeline frame.
    frame_valid : numpy.ndarray
        True where the frame was read from a file.
    segment : numpy.ndarray
        Segment number of each frame (ingest splits the time axis at long gaps).
    """

    source: str
    cube_path: str
    cube_step: int
    step: int
    cube_index: np.ndarray
    times: np.ndarray
    frame_valid: np.ndarray
    segment: np.ndarray

    @classmethod
    def from_cube(
        cls, source: str, path: str, cube: xr.Dataset, resample_minutes: int | None = None
    ) -> Timeline:
        """Timeline of an open cube; only ``time``, ``frame_valid`` and ``segment`` are read."""
        cube_step = cube_timestep(cube)
        cube_times = np.asarray(cube["time"].values, dtype="datetime64[ns]")
        kept = aligned_frames(cube_times, cube_step, resample_minutes)
        step = (resample_minutes or cube_step) // cube_step
        return cls(
            source=source,
            cube_path=path,
            cube_step=cube_step,
            step=step,
            cube_index=kept,
            times=cube_times[kept],
            frame_valid=np.asarray(cube["frame_valid"].values, dtype=bool)[kept],
            segment=cube_segments(cube)[kept],
        )

    @property
    def timestep(self) -> int:
        """Minutes between timeline frames."""
        return self.cube_step * self.step

    def __len__(self) -> int:
        return len(self.times)

    def cube_slice(self, start: int, n_frames: int) -> slice:
        """Cube time slice of the ``n_frames`` timeline frames from ``start`` (one window)."""
        first = int(self.cube_index[start])
        return slice(first, first + (n_frames - 1) * self.step + 1, self.step)


def frame_counts(timelines: list[Timeline], n_input: int | None, n_target: int | None):
    """Input and target frame counts of an experiment; every source must share the timestep."""
    steps = {t.source: t.timestep for t in timelines}
    if len(set(steps.values())) > 1:
        raise ConfigError(
            f"sources have different timesteps {steps} (minutes); set patches.resample_minutes "
            "to a common multiple"
        )
    default_in, default_out = default_frame_counts(timelines[0].timestep)
    return n_input or default_in, n_target or default_out


# --------------------------------------------------------------------------------------------
# split labels


def labels_by_fraction(
    n_frames: int, fractions: dict[str, float], pattern: list[str], n_cycles: int
) -> np.ndarray:
    """Split label of each frame: contiguous blocks following ``pattern``, ``n_cycles`` times.

    A split that appears several times in the pattern shares its fraction between its blocks.
    Fractions are of the frames stored in the cube, so long gaps between segments take no share.
    """
    occurrences = Counter(pattern)
    blocks = list(pattern) * n_cycles
    weights = np.array([fractions[s] / occurrences[s] for s in blocks])
    edges = np.rint(np.concatenate([[0.0], np.cumsum(weights)]) / weights.sum() * n_frames)
    labels = np.full(n_frames, "", dtype=object)
    for split, start, stop in zip(
        blocks, edges[:-1].astype(int), edges[1:].astype(int), strict=True
    ):
        labels[start:stop] = split
    return labels


def labels_by_time(times: np.ndarray, split_times: dict) -> np.ndarray:
    """Split label of each frame from explicit time ranges; a left-out split takes the rest.

    ``split_times`` maps a split to ranges with ``start`` and ``end`` attributes (both included).
    """
    labels = np.full(times.shape, "", dtype=object)
    for split, ranges in split_times.items():
        for time_range in ranges:
            inside = (times >= np.datetime64(time_range.start)) & (
                times <= np.datetime64(time_range.end)
            )
            clash = sorted(set(labels[inside]) - {"", split})
            if clash:
                raise ConfigError(
                    f"split_times: {split} range {time_range.start} - {time_range.end} overlaps "
                    f"split {clash[0]}"
                )
            labels[inside] = split
    rest = [s for s in SPLITS if s not in split_times]
    if rest:
        labels[labels == ""] = rest[0]
    return labels


def carve_buffer(times: np.ndarray, labels: np.ndarray, buffer_minutes: int) -> np.ndarray:
    """Unlabel frames closer than ``buffer_minutes`` to a frame of a higher-priority split.

    Test frames are never removed; val frames give way to test, train frames to val and test.
    After this, any two frames of different splits are at least ``buffer_minutes`` apart.
    """
    labels = labels.copy()
    if buffer_minutes <= 0:
        return labels
    buffer = np.timedelta64(buffer_minutes, "m")
    for rank, split in enumerate(SPLIT_PRIORITY[1:], start=1):
        higher = np.sort(times[np.isin(labels, SPLIT_PRIORITY[:rank])])
        if higher.size == 0:
            continue
        own = np.flatnonzero(labels == split)
        position = np.searchsorted(higher, times[own])
        after = higher[np.minimum(position, higher.size - 1)]
        before = higher[np.maximum(position - 1, 0)]
        near = (np.abs(after - times[own]) < buffer) | (np.abs(times[own] - before) < buffer)
        labels[own[near]] = ""
    return labels


def split_labels(timeline: Timeline, splits) -> np.ndarray:
    """Split label of each timeline frame, buffer carved.

    ``splits`` has the split fields of ``PatchesConfig``: ``split_times`` (or None),
    ``split_fractions``, ``block_pattern``, ``n_cycles`` and ``buffer_minutes``.
    """
    if splits.split_times is not None:
        labels = labels_by_time(timeline.times, splits.split_times)
    else:
        labels = labels_by_fraction(
            len(timeline), splits.split_fractions, splits.block_pattern, splits.n_cycles
        )
    return carve_buffer(timeline.times, labels, splits.buffer_minutes)


def label_blocks(times: np.ndarray, labels: np.ndarray, segment=None) -> list[dict]:
    """Contiguous runs of one split label: ``{split, start, end}`` (ISO, ``end`` included).

    A run also ends at a segment boundary, so a block never spans a long gap.
    """
    segment = np.zeros(len(labels), dtype=np.int32) if segment is None else np.asarray(segment)
    blocks = []
    start = 0
    for index in range(1, len(labels) + 1):
        if (
            index == len(labels)
            or labels[index] != labels[start]
            or segment[index] != segment[start]
        ):
            if labels[start]:
                blocks.append(
                    {
                        "split": str(labels[start]),
                        "start": pd.Timestamp(times[start]).isoformat(),
                        "end": pd.Timestamp(times[index - 1]).isoformat(),
                    }
                )
            start = index
    return blocks


# --------------------------------------------------------------------------------------------
# listing


def valid_starts(
    timeline: Timeline, labels: np.ndarray, n_frames: int, frame_step: int = 1
) -> np.ndarray:
    """Timeline indices of the first frames of every valid window.

    A window's ``n_frames`` frames (every ``frame_step``-th timeline frame from its start, see
    :func:`frames_per_model_step`) are all valid, all carry the same (non-empty) split label, all
    lie in
    one segment and are exactly ``frame_step`` timesteps apart.
    """
    n_windows = len(timeline) - (n_frames - 1) * frame_step
    if n_windows <= 0:
        return np.zeros(0, dtype=np.int64)
    first = np.arange(n_windows)
    members = first[:, None] + frame_step * np.arange(n_frames)[None, :]
    last = members[:, -1]
    valid = timeline.frame_valid[members].all(axis=1)
    labelled = labels[:n_windows] != ""
    frames = labels[members]
    one_split = (frames == frames[:, :1]).all(axis=1)
    one_segment = timeline.segment[first] == timeline.segment[last]
    span = np.timedelta64(timeline.timestep * frame_step * (n_frames - 1), "m")
    regular = (timeline.times[last] - timeline.times[first]) == span
    return np.flatnonzero(valid & labelled & one_split & one_segment & regular)


def list_windows(
    timeline: Timeline, labels: np.ndarray, n_input: int, n_target: int, frame_step: int = 1
) -> pd.DataFrame:
    """Every valid window of a timeline, in time order.

    With ``frame_step`` k > 1 a window takes every k-th timeline frame (a model whose step is k
    source steps, :func:`frames_per_model_step`); windows still start at every timeline frame.

    Returns
    -------
    pandas.DataFrame
        One row per window: ``source``, ``cube_path``, ``start`` (timeline index of the first
        frame), ``cube_start`` (its cube index), ``start_time``, ``reference_time`` (last input
        frame), ``split`` and ``segment``.
    """
    starts = valid_starts(timeline, labels, n_input + n_target, frame_step)
    return pd.DataFrame(
        {
            "source": timeline.source,
            "cube_path": timeline.cube_path,
            "start": starts,
            "cube_start": timeline.cube_index[starts],
            "start_time": timeline.times[starts],
            "reference_time": timeline.times[starts + (n_input - 1) * frame_step],
            "split": labels[starts].astype(str),
            "segment": timeline.segment[starts],
        }
    )


def window_frame_indices(starts: np.ndarray, n_frames: int) -> np.ndarray:
    """Sorted unique timeline indices of all frames used by windows starting at ``starts``."""
    starts = np.asarray(starts, dtype=np.int64)
    return np.unique((starts[:, None] + np.arange(n_frames)[None, :]).ravel())


# --------------------------------------------------------------------------------------------
# thinning


def select_windows(
    reference_times: np.ndarray, window_step: int, max_windows: int | None
) -> np.ndarray:
    """Indices of the windows kept: every ``window_step``-th, then at most ``max_windows`` evenly.

    Parameters
    ----------
    reference_times : numpy.ndarray
        Sorted reference times of one source's windows.
    window_step : int
        Keep every ``window_step``-th window (consecutive windows overlap almost entirely, so their
        scores are strongly correlated; a window_step bounds the cost without losing much).
    max_windows : int, optional
        Then keep at most this many, spread evenly over the kept ones.

    Returns
    -------
    numpy.ndarray
        Indices into ``reference_times``.
    """
    kept = np.arange(0, len(reference_times), window_step)
    if max_windows is not None and kept.size > max_windows:
        kept = kept[np.unique(np.linspace(0, kept.size - 1, max_windows).round().astype(int))]
    return kept


def on_time_grid(reference_times, stride_minutes: int) -> np.ndarray:
    """Boolean mask of the reference times a whole number of ``stride_minutes`` after the first.

    Unlike :func:`select_windows` this keeps a fixed clock grid across gaps, which is what an
    archive of exported forecasts wants (one file every ``stride_minutes``).
    """
    times = pd.to_datetime(pd.Series(np.asarray(reference_times, dtype="datetime64[ns]")))
    if times.empty:
        return np.zeros(0, dtype=bool)
    offset = (times - times.min()) / pd.Timedelta(minutes=stride_minutes)
    return (offset == offset.round()).to_numpy()


# --------------------------------------------------------------------------------------------
# windows read from a cube by time


class FramesNotInCubeError(ConfigError, KeyError):
    """Frames a window needs are not in the cube (also a KeyError, as a failed ``.sel`` was)."""

    __str__ = Exception.__str__  # KeyError would quote the message


def cube_time_indices(cube: xr.Dataset, times, what: str = "frames") -> np.ndarray:
    """Cube indices of ``times``; every one must be a stored frame of one segment.

    Raises
    ------
    FramesNotInCubeError
        Naming the times that the cube does not hold (outside it, or in a long gap between
        segments), or the segments a window would cross.
    """
    cube_times = pd.DatetimeIndex(cube["time"].values)
    wanted = pd.DatetimeIndex(np.asarray(times, dtype="datetime64[ns]"))
    indices = cube_times.get_indexer(wanted)
    if (indices < 0).any():
        missing = ", ".join(t.isoformat() for t in wanted[indices < 0][:5])
        source = cube.attrs.get("source", "cube")
        raise FramesNotInCubeError(
            f"{source}: {what} at {missing} are not in the cube (outside its time range or in a "
            "gap between segments)"
        )
    segments = np.unique(cube_segments(cube)[indices])
    if segments.size > 1:
        raise FramesNotInCubeError(
            f"{what} from {wanted[0].isoformat()} to {wanted[-1].isoformat()} cross segments "
            f"{segments.tolist()} of the cube: a window never spans a long gap"
        )
    return indices
