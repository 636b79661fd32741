"""``nowcast predict --watch``: one long-lived process that issues a nowcast for every new frame.

The model is loaded once (:class:`nowcast.predict.issue.Predictor`); each poll lists the source's
files through the catalog's patterns (:func:`nowcast.sources.catalog.discover_files`, over the
``path_fmt`` folders from ``keep_hours`` before the newest frame to a day after it, so the walk
crosses midnight; the catalog's ``end`` is ignored) and handles what changed:

* **Complete files only.** A file is read once its size has stayed the same for
  ``settle_seconds`` (a writer that renames into place gives a file that is already complete;
  one that writes in place is caught growing). Its *completion time* is the first poll that saw
  its final size: latencies count from there.
* **Corrupt files.** A file that fails to decode is tried once more after the settle time, then
  logged ``corrupt`` and skipped. Every reference time whose ``n_input_frames`` inputs are not
  all readable gets one ``skipped`` line naming the missing input, and no nowcast.
* **Late files** get their nowcast, and complete the inputs of later reference times, which then
  get theirs. ``latest.json`` only moves forward in time.
* **Backlog.** When several frames are ready at once the newest goes first, then the rest from
  newest to oldest (``order="newest"``; ``"oldest"`` reverses that). Nothing is dropped unless
  it is older than ``keep_hours`` before the newest frame; older outputs are deleted by
  reference time, and a restart looks back no further. Outputs that exist (their manifest) are
  not redone.
* **Gaps** between consecutive frames longer than the source's step are logged.
* **Stopping.** SIGTERM or SIGINT stops the loop after the current nowcast: every file is
  written atomically (:mod:`nowcast.storage`), so nothing partial or temporary is left.

One JSON line per event goes to stdout (``received``, ``corrupt``, ``skipped`` with the reason,
``issued`` with ``latency_s`` to the NetCDF's publication, ``set_latency_s`` to the whole
set's, ``wall_s`` from taking the frame up to ``latest.json``, ``work_s`` of the stages and
``rss_mb``; ``failed``, ``gap``, ``deleted``, ``heartbeat``), so a log shipper can parse it.
One watcher at a time holds ``<out_dir>/.watch.lock``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd

from nowcast import storage
from nowcast.config import UserError
from nowcast.predict.issue import Predictor
from nowcast.predict.outputs import manifest_reference, set_files
from nowcast.sources.catalog import Catalog, FrameRef, discover_files
from nowcast.sources.cube import build_cube
from nowcast.sources.frames import read_frame_status, source_grid
from nowcast.windows import input_times

__all__ = ["LATEST_FILE", "LOCK_FILE", "WatchSettings", "Watcher", "rss_bytes"]

LATEST_FILE = "latest.json"
LOCK_FILE = ".watch.lock"


@dataclasses.dataclass
class WatchSettings:
    """How the watcher polls, waits and keeps.

    Attributes
    ----------
    poll_seconds : float
        Seconds between two listings of the source's folders (at most 2 by default).
    settle_seconds : float
        Seconds a file's size must stay the same before it is read.
    keep_hours : float
        Frames and outputs older than this before the newest frame are dropped and deleted.
    order : {"newest", "oldest"}
        Backlog order after the newest frame.
    heartbeat_seconds : float
        Seconds between heartbeat lines.
    max_nowcasts : int, optional
        Stop after this many nowcasts (benchmarks and tests).
    idle_exit_seconds : float, optional
        Stop when nothing has changed for this long (replays).
    """

    poll_seconds: float = 1.0
    settle_seconds: float = 1.0
    keep_hours: float = 24.0
    order: str = "newest"
    heartbeat_seconds: float = 60.0
    max_nowcasts: int | None = None
    idle_exit_seconds: float | None = None

    def __post_init__(self) -> None:
        if self.order not in ("newest", "oldest"):
            raise ValueError(f"order must be 'newest' or 'oldest', got {self.order!r}")
        if self.poll_seconds <= 0 or self.settle_seconds < 0 or self.keep_hours <= 0:
            raise ValueError("poll_seconds and keep_hours must be > 0, settle_seconds >= 0")


def rss_bytes() -> int:
    """Resident memory of this process (Linux ``/proc``; 0 where it cannot be read)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


@dataclasses.dataclass
class _File:
    path: str
    size: int
    first_seen: float  # monotonic time of the first poll that saw this size
    state: str = "growing"  # growing, ok, retry, corrupt
    tried_at: float = 0.0


class Watcher:
    """Poll a source's folder and issue a nowcast for every frame whose inputs are complete.

    Parameters
    ----------
    predictor : nowcast.predict.issue.Predictor
        The loaded model and how its nowcasts are written.
    catalog : Catalog
        The catalog that names the source and its file patterns.
    out_dir : str or Path
        Where the nowcasts, ``latest.json`` and the lock go.
    settings : WatchSettings, optional
    log : callable, optional
        Receives each event dict; by default one JSON line on stdout.
    """

    def __init__(
        self,
        predictor: Predictor,
        catalog: Catalog,
        out_dir: str | Path,
        settings: WatchSettings | None = None,
        log: Callable[[dict], None] | None = None,
    ) -> None:
        self.predictor = predictor
        self.source = catalog[predictor.source]
        self.out_dir = Path(out_dir)
        self.settings = settings or WatchSettings()
        self._log = log or _print_event
        self.step = timedelta(minutes=int(predictor.step))
        self.files: dict[datetime, _File] = {}
        self.frames: OrderedDict[datetime, np.ndarray] = OrderedDict()
        self.done: set[datetime] = set()
        self.skipped: dict[datetime, str] = {}
        self.latest: datetime | None = None
        self.grid = None
        self.stopping = False
        self.nowcasts = 0
        self.latencies: list[float] = []
        self.work_seconds: list[float] = []
        # Decoded frames kept: one input set plus a backlog's worth, so memory stays flat.
        stride = max(1, int(predictor.step) // int(self.source.timestep))
        self.cache_size = 3 * predictor.n_input_frames * stride + 4

    # ---- events -------------------------------------------------------------------------

    def log(self, event: str, **fields) -> None:
        self._log({"event": event, "time": pd.Timestamp.now("UTC").isoformat(), **fields})

    # ---- the loop -----------------------------------------------------------------------

    def run(self) -> dict:
        """Watch until stopped (SIGTERM, SIGINT, ``max_nowcasts`` or ``idle_exit_seconds``).

        Returns
        -------
        dict
            ``nowcasts``, ``latencies`` (seconds from file completion to the NetCDF's
            publication) and ``work_seconds`` (each nowcast's own time).
        """
        previous = {sig: signal.signal(sig, self._stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            with storage.exclusive_lock(self.out_dir / LOCK_FILE):
                self._resume()
                self._loop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return {
            "nowcasts": self.nowcasts,
            "latencies": self.latencies,
            "work_seconds": self.work_seconds,
        }

    def _stop(self, signum, frame) -> None:
        self.stopping = True

    def _loop(self) -> None:
        settings = self.settings
        last_change = last_beat = time.monotonic()
        while not self.stopping:
            changed = self.poll()
            changed |= self.issue_ready()
            if changed:
                self._expire()
            now = time.monotonic()
            if changed:
                last_change = now
            if now - last_beat >= settings.heartbeat_seconds:
                self.heartbeat()
                last_beat = now
            if settings.max_nowcasts is not None and self.nowcasts >= settings.max_nowcasts:
                break
            if settings.idle_exit_seconds is not None:
                if now - last_change >= settings.idle_exit_seconds:
                    break
            if not changed:
                self._sleep(settings.poll_seconds)
        self.heartbeat()

    def _sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < end:
            time.sleep(min(0.1, end - time.monotonic()))

    def heartbeat(self) -> None:
        self.log(
            "heartbeat",
            nowcasts=self.nowcasts,
            frames=len(self.files),
            latest=None if self.latest is None else self.latest.isoformat(),
            rss_mb=round(rss_bytes() / 2**20, 1),
        )

    # ---- files --------------------------------------------------------------------------

    def _listing(self) -> dict[datetime, str]:
        if not self.files:
            return discover_files(self.source)
        newest = max(self.files)
        start = newest - timedelta(hours=self.settings.keep_hours)
        return discover_files(self.source, start, newest + timedelta(days=1))

    def poll(self) -> bool:
        """List the files; note new and grown ones and read those that have settled."""
        now = time.monotonic()
        changed = False
        horizon = self._frame_horizon()
        for when, path in self._listing().items():
            if horizon is not None and when < horizon:
                continue
            try:
                size = os.stat(path).st_size
            except OSError:
                continue  # gone between the listing and the stat (a rename in progress)
            known = self.files.get(when)
            if known is None or known.path != path or known.size != size:
                self.files[when] = _File(path, size, now)
                changed = True
            elif known.state in ("growing", "retry"):
                changed |= self._read(when, known, now)
        return changed

    def _read(self, when: datetime, entry: _File, now: float) -> bool:
        settle = self.settings.settle_seconds
        if now - max(entry.first_seen, entry.tried_at) < settle:
            return False
        if self.grid is None:
            self.grid = source_grid(self.source, [FrameRef(when, entry.path)])
        data, status = read_frame_status(FrameRef(when, entry.path), self.source, self.grid)
        if data is None and entry.state == "growing":
            entry.state, entry.tried_at = "retry", now  # once more, after the settle time
            return False
        if data is None:
            entry.state = "corrupt"
            self.log("corrupt", frame=when.isoformat(), file=entry.path, reason=status["reason"])
            return True
        entry.state = "ok"
        self._remember(when, data)
        self.log("received", frame=when.isoformat(), file=entry.path)
        self._log_gap(when)
        return True

    def _remember(self, when: datetime, data: np.ndarray) -> None:
        self.frames[when] = data
        self.frames.move_to_end(when)
        while len(self.frames) > self.cache_size:
            self.frames.popitem(last=False)

    def _log_gap(self, when: datetime) -> None:
        earlier = [t for t, f in self.files.items() if t < when and f.state == "ok"]
        if earlier and when - max(earlier) > self.step:
            self.log("gap", after=max(earlier).isoformat(), before=when.isoformat())

    def _horizon(self) -> datetime | None:
        """The oldest reference time kept: ``keep_hours`` before the newest frame."""
        if not self.files:
            return None
        return max(self.files) - timedelta(hours=self.settings.keep_hours)

    def _frame_horizon(self) -> datetime | None:
        """The oldest frame kept: the first input of the oldest reference time kept."""
        horizon = self._horizon()
        if horizon is None:
            return None
        return horizon - (self.predictor.n_input_frames - 1) * self.step

    # ---- nowcasts -----------------------------------------------------------------------

    def _inputs(self, reference: datetime) -> list[datetime]:
        step = int(self.predictor.step)
        times = pd.DatetimeIndex(input_times(reference, self.predictor.n_input_frames, step))
        return list(times.to_pydatetime())

    def _missing(self, reference: datetime) -> str | None:
        for when in self._inputs(reference):
            entry = self.files.get(when)
            if entry is None:
                return f"input {when.isoformat()} missing"
            if entry.state == "corrupt":
                return f"input {when.isoformat()} corrupt ({entry.path})"
            if entry.state != "ok":
                return "waiting"
        return None

    def ready(self) -> list[datetime]:
        """Reference times to issue now, in the order they are issued."""
        candidates = []
        horizon = self._horizon()
        for when, entry in self.files.items():
            if entry.state not in ("ok", "corrupt") or when in self.done or when < horizon:
                continue
            reason = self._missing(when)
            if reason is None:
                candidates.append(when)
            elif reason != "waiting" and self.skipped.get(when) is None:
                self.skipped[when] = reason
                self.log("skipped", reference=when.isoformat(), reason=reason)
        candidates.sort(reverse=True)
        if self.settings.order == "oldest" and candidates:
            candidates = candidates[:1] + sorted(candidates[1:])
        return candidates

    def issue_ready(self) -> bool:
        issued = False
        for reference in self.ready():
            if self.stopping:
                break
            self.issue(reference)
            issued = True
            if self.settings.max_nowcasts is not None:
                if self.nowcasts >= self.settings.max_nowcasts:
                    break
        return issued

    def issue(self, reference: datetime) -> None:
        """Issue (or, when its manifest exists, acknowledge) the nowcast of ``reference``."""
        self.done.add(reference)
        if self.predictor.manifest_path(self.out_dir, reference).exists():
            self._advance(reference, None)
            return
        times = self._inputs(reference)
        frames = [self._frame(when) for when in times]
        start = time.perf_counter()
        cube = build_cube(
            np.stack(frames),
            times,
            np.ones(len(times), bool),
            self.grid,
            {"source": self.predictor.source, "timestep_minutes": self.source.timestep},
        )
        try:
            result = self.predictor.issue(cube, pd.Timestamp(reference), self.out_dir)
        except (UserError, OSError, ValueError, ArithmeticError) as err:
            # One frame's failure is one line; the next frames still get their nowcasts.
            self.log("failed", reference=reference.isoformat(), reason=_one_line(err))
            return
        self._advance(reference, result)
        # wall: the frame taken up to latest.json written; work: the stages, as predict times
        # them (a one-shot predict's wall adds its start-up to the same work).
        wall, work = time.perf_counter() - start, result.work_seconds
        complete = max(self.files[when].first_seen for when in times)
        latency = result.published_at - complete
        self.nowcasts += 1
        self.latencies.append(latency)
        self.work_seconds.append(work)
        self.log(
            "issued",
            reference=reference.isoformat(),
            latency_s=round(latency, 3),
            set_latency_s=round(time.monotonic() - complete, 3),
            wall_s=round(wall, 3),
            work_s=round(work, 3),
            rss_mb=round(rss_bytes() / 2**20, 1),
            netcdf=result.netcdf,
        )

    def _frame(self, when: datetime) -> np.ndarray:
        if when not in self.frames:
            entry = self.files[when]
            data, _ = read_frame_status(FrameRef(when, entry.path), self.source, self.grid)
            self._remember(when, data)
        return self.frames[when]

    def _advance(self, reference: datetime, result) -> None:
        """Point ``latest.json`` at ``reference`` if it is the newest nowcast so far."""
        if self.latest is not None and reference <= self.latest:
            return
        manifest = self.predictor.manifest_path(self.out_dir, reference)
        record = json.loads(manifest.read_text())
        storage.write_text(self.out_dir / LATEST_FILE, json.dumps(record, indent=1) + "\n")
        self.latest = reference

    # ---- keep_hours ---------------------------------------------------------------------

    def _resume(self) -> None:
        """A restart: ``latest.json`` says where the last run was."""
        path = self.out_dir / LATEST_FILE
        if path.exists():
            record = json.loads(path.read_text())
            self.latest = pd.Timestamp(record["reference_time"]).to_pydatetime()

    def _expire(self) -> None:
        horizon, frames = self._horizon(), self._frame_horizon()
        if horizon is None:
            return
        for when in [t for t in self.files if t < frames]:
            del self.files[when]
            self.frames.pop(when, None)
            self.done.discard(when)
            self.skipped.pop(when, None)
        for manifest in self.out_dir.glob(f"{self.predictor.source}_*Z.json"):
            reference = manifest_reference(manifest)
            if reference is not None and reference < horizon:
                for path in set_files(manifest):
                    storage.remove(path)
                self.log("deleted", reference=reference.isoformat())


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def _print_event(event: dict) -> None:
    sys.stdout.write(json.dumps(event, default=str) + "\n")
    sys.stdout.flush()
