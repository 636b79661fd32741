"""``nowcast predict --watch`` replayed on real BoM frames copied one at a time into a folder.

The watcher runs as its own process, as it does in operations: frames arrive (one late, one
corrupt, one written in two pieces), nowcasts come out in arrival order, each readable by
pysteps, a SIGTERM leaves nothing behind, and a restart redoes nothing.
"""

from __future__ import annotations

import json
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import yaml

from nowcast import import_pysteps

pytestmark = pytest.mark.realdata

import_netcdf_pysteps = import_pysteps("pysteps.io.nowcast_importers").import_netcdf_pysteps

FOLDER = "prcp-c10/66/2020/10/31"
FIRST = datetime(2020, 10, 31, 8, 20)
#: F0..F13, ten minutes apart; the model reads six inputs.
FRAMES = [FIRST + timedelta(minutes=10 * k) for k in range(14)]
LATE, CORRUPT, IN_PIECES = 4, 7, 10
#: Arrival order: F4 comes after F5.
ARRIVALS = [0, 1, 2, 3, 5, 4, 6, 7, 8, 9, 10, 11, 12, 13]
TIMEOUT = 60


def file_name(when: datetime) -> str:
    return f"66_{when:%Y%m%d_%H%M}00.prcp-c10.nc"


class Watch:
    """A ``nowcast predict --watch`` process and the events of its stdout."""

    def __init__(self, catalog: Path, out_dir: Path, *extra: str) -> None:
        command = [sys.executable, "-m", "nowcast.cli", "predict", "--source", "bom"]
        command += ["--catalog", str(catalog), "--watch", "--out-dir", str(out_dir)]
        command += ["--poll-seconds", "0.2", "--settle-seconds", "0.4", *extra]
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.events: list[dict] = []
        self._queue: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self._queue.put(json.loads(line))

    def wait_for(self, event: str, **fields) -> dict:
        """The first event (seen or to come) of this kind with these fields."""
        deadline = time.monotonic() + TIMEOUT
        while True:
            for seen in self.events:
                if seen["event"] == event and all(seen.get(k) == v for k, v in fields.items()):
                    return seen
            remaining = deadline - time.monotonic()
            if self.process.poll() is not None:
                self._reader.join(timeout=5)  # the last lines of a finished process
            if remaining <= 0 or self.process.poll() is not None and self._queue.empty():
                stderr = self.process.stderr.read() if self.process.poll() is not None else ""
                raise AssertionError(f"no {event} {fields}; events {self.events}\n{stderr}")
            try:
                self.events.append(self._queue.get(timeout=min(remaining, 0.5)))
            except queue.Empty:
                pass

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=TIMEOUT)
        self._reader.join(timeout=5)
        while not self._queue.empty():
            self.events.append(self._queue.get())
        return code

    def of(self, event: str) -> list[dict]:
        return [e for e in self.events if e["event"] == event]


@pytest.fixture(scope="module")
def replay(data_root, tmp_path_factory):
    """Deliver the frames as ARRIVALS says, then SIGTERM the watcher."""
    root = tmp_path_factory.mktemp("watch")
    incoming, out_dir = root / "incoming", root / "out"
    (incoming / FOLDER).mkdir(parents=True)
    source = yaml.safe_load((Path(__file__).parents[1] / "data_catalog.yaml").read_text())
    bom = {**source["sources"]["bom"], "root_path": str(incoming)}
    catalog = root / "catalog.yaml"
    catalog.write_text(yaml.safe_dump({"sources": {"bom": bom}}))
    original = data_root / "radar" / "bom" / FOLDER
    watch = Watch(catalog, out_dir)
    for k in ARRIVALS:
        when, target = FRAMES[k], incoming / FOLDER / file_name(FRAMES[k])
        if k == CORRUPT:
            target.write_bytes(b"not a netCDF file" * 100)
            watch.wait_for("corrupt", frame=when.isoformat())
            continue
        if k == IN_PIECES:
            # Written in place in two pieces: it must not be read in between.
            data = (original / file_name(when)).read_bytes()
            with open(target, "wb") as handle:
                handle.write(data[: len(data) // 2])
                handle.flush()
                time.sleep(0.25)
                handle.write(data[len(data) // 2 :])
        else:
            shutil.copy(original / file_name(when), target)
        watch.wait_for("received", frame=when.isoformat())
    watch.wait_for("issued", reference=FRAMES[13].isoformat())
    code = watch.stop()
    return watch, code, out_dir, catalog


def test_one_nowcast_per_frame_with_its_inputs_in_arrival_order(replay):
    watch, code, out_dir, _ = replay
    assert code == 0
    issued = [e["reference"] for e in watch.of("issued")]
    # F5 waits for the late F4; the corrupt F7 and the five after it have no complete inputs.
    assert issued == [FRAMES[k].isoformat() for k in (5, 6, 13)]
    skipped = {e["reference"]: e["reason"] for e in watch.of("skipped")}
    assert len(skipped) == len(watch.of("skipped"))  # one line per frame
    for k in range(CORRUPT, CORRUPT + 6):
        assert f"input {FRAMES[CORRUPT].isoformat()} corrupt" in skipped[FRAMES[k].isoformat()]
    assert "missing" in skipped[FRAMES[5].isoformat()]  # before F4 came
    gaps = [(e["after"], e["before"]) for e in watch.of("gap")]
    assert (FRAMES[3].isoformat(), FRAMES[5].isoformat()) in gaps
    assert not [e for e in watch.of("corrupt") if e["frame"] != FRAMES[CORRUPT].isoformat()]
    latest = json.loads((out_dir / "latest.json").read_text())
    assert latest["reference_time"] == FRAMES[13].isoformat()
    for event in watch.of("issued"):
        assert event["latency_s"] > 0 and event["work_s"] > 0


def test_every_nowcast_is_read_by_pysteps_and_sigterm_leaves_nothing_behind(replay):
    watch, _, out_dir, _ = replay
    netcdfs = sorted(out_dir.glob("*.nc"))
    assert len(netcdfs) == 3
    for path in netcdfs:
        precip, metadata = import_netcdf_pysteps(str(path), onerror="raise")
        assert precip.shape[0] == 6 and np.isfinite(precip).any()
        manifest = json.loads(path.with_suffix(".json").read_text())
        assert path.name in manifest["files"]
    names = {p.name for p in out_dir.iterdir()}
    expected = {f"{p.stem}{ext}" for p in netcdfs for ext in (".nc", ".png", ".json")}
    assert names == expected | {"latest.json"}  # no lock, no temporary file
    assert watch.of("heartbeat")  # the last one, on the way out


def test_a_restart_redoes_nothing_and_latest_stays(replay):
    _, _, out_dir, catalog = replay
    before = {p.name: p.stat().st_mtime_ns for p in out_dir.iterdir()}
    again = Watch(catalog, out_dir, "--exit-when-idle", "3")
    assert again.process.wait(timeout=TIMEOUT) == 0
    again.wait_for("heartbeat")
    assert not again.of("issued")
    after = {p.name: p.stat().st_mtime_ns for p in out_dir.iterdir()}
    assert after == before


def test_keep_hours_deletes_older_sets_and_bounds_the_restart(replay):
    _, _, out_dir, catalog = replay
    # The newest frame is 10:30: half an hour back keeps only F13's set (10:30).
    again = Watch(catalog, out_dir, "--exit-when-idle", "3", "--keep-hours", "0.5")
    assert again.process.wait(timeout=TIMEOUT) == 0
    again.wait_for("heartbeat")
    deleted = sorted(e["reference"] for e in again.of("deleted"))
    assert deleted == [FRAMES[5].isoformat(), FRAMES[6].isoformat()]
    assert sorted(p.name for p in out_dir.glob("*.nc")) == ["bom_20201031T1030Z.nc"]
    # Frames before the horizon are not looked at: no skip is logged for them.
    assert all(e["reference"] >= FRAMES[10].isoformat() for e in again.of("skipped"))
    assert (
        json.loads((out_dir / "latest.json").read_text())["reference_time"]
        == FRAMES[13].isoformat()
    )


def test_a_backlog_goes_newest_first_then_in_the_chosen_order(tmp_path):
    from nowcast.predict.watch import Watcher, WatchSettings, _File
    from nowcast.sources.catalog import load_catalog

    class Stub:  # what the watcher reads of a Predictor
        source, step, n_input_frames = "bom", 10, 2

    times = [FIRST + timedelta(minutes=10 * k) for k in range(5)]
    for order, expected in [("newest", [4, 3, 2, 1]), ("oldest", [4, 1, 2, 3])]:
        settings = WatchSettings(order=order, keep_hours=24)
        watcher = Watcher(Stub(), load_catalog(), tmp_path, settings, log=lambda event: None)
        watcher.files = {when: _File(str(when), 1, 0.0, state="ok") for when in times}
        assert watcher.ready() == [times[k] for k in expected]  # times[0] lacks its input
    with pytest.raises(ValueError, match="order"):
        WatchSettings(order="random")


def test_the_listing_crosses_midnight_and_ignores_the_catalog_end(tmp_path, data_root):
    from nowcast.predict.watch import Watcher, WatchSettings
    from nowcast.sources.catalog import load_catalog

    class Stub:
        source, step, n_input_frames = "bom", 10, 2

    original = data_root / "radar" / "bom" / FOLDER / file_name(FRAMES[0])
    source = yaml.safe_load((Path(__file__).parents[1] / "data_catalog.yaml").read_text())
    # The catalog's end is before both frames: the watcher lists them anyway.
    bom = {**source["sources"]["bom"], "root_path": str(tmp_path), "end": "2020-10-31T00:10"}
    (tmp_path / "catalog.yaml").write_text(yaml.safe_dump({"sources": {"bom": bom}}))
    catalog = load_catalog(tmp_path / "catalog.yaml")
    settings = WatchSettings(poll_seconds=0.1, settle_seconds=0.0)
    watcher = Watcher(Stub(), catalog, tmp_path / "out", settings, log=lambda event: None)
    before, after = datetime(2020, 10, 31, 23, 50), datetime(2020, 11, 1, 0, 0)
    for when in (before, after):
        folder = tmp_path / f"prcp-c10/66/{when:%Y/%m/%d}"
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(original, folder / file_name(when))
        watcher.poll()  # first sight
        watcher.poll()  # settled: read
        assert watcher.files[when].state == "ok"
    assert sorted(watcher.files) == [before, after]
