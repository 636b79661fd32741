"""``nowcast predict --watch`` replaying the whole BoM day: latency, memory and wall ÷ work.

The 144 BoM frames are delivered one at a time into an empty folder, each written under a
temporary name and renamed into place as an operational feed does; the next frame comes once
the watcher has dealt with the previous one (issued or skipped it), so every nowcast is made at
steady state with the model loaded once. The watcher runs with its default poll and settle
times. From its ``issued`` lines:

* latency: seconds from the moment a frame is complete (first seen at its final size) to the
  NetCDF's publication, p50 / p95 / max (target p95 <= 10 s on 2 CPU cores at 512²);
* wall ÷ work per nowcast: the watcher's wall time on a nowcast (from taking the frame up to
  ``latest.json``) over the work its stages report, as ``nowcast predict`` times them, median
  (target <= 1.3: start-up is paid once; a fresh ``nowcast predict`` pays it every time); and,
  beside it, completion to the whole set's publication over that work, which adds the settle
  and poll waits;
* memory: the watcher's RSS after the last nowcast over its RSS after the tenth (target <= 1.1).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks.common import save, table

REPO = Path(__file__).resolve().parents[1]
FOLDER = "prcp-c10/66/2020/10/31"
TIMEOUT = 120


def _events(process: subprocess.Popen):
    for line in process.stdout:
        yield json.loads(line)


def replay(data_root: Path, work: Path) -> list[dict]:
    """Deliver every BoM frame in turn; return the watcher's events."""
    incoming, out_dir = work / "incoming", work / "out"
    (incoming / FOLDER).mkdir(parents=True)
    catalog = yaml.safe_load((REPO / "data_catalog.yaml").read_text())
    bom = {**catalog["sources"]["bom"], "root_path": str(incoming)}
    (work / "catalog.yaml").write_text(yaml.safe_dump({"sources": {"bom": bom}}))
    command = [sys.executable, "-m", "nowcast.cli", "predict", "--source", "bom", "--watch"]
    command += ["--catalog", str(work / "catalog.yaml"), "--out-dir", str(out_dir)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=REPO)
    events, stream = [], _events(process)
    frames = sorted((data_root / "radar" / "bom" / FOLDER).glob("*.nc"))
    try:
        for path in frames:
            partial = incoming / FOLDER / f".{path.name}.part"
            shutil.copy(path, partial)
            os.rename(partial, incoming / FOLDER / path.name)
            frame = None
            for event in stream:  # until the watcher has dealt with this frame
                events.append(event)
                if event["event"] == "received":
                    frame = event["frame"]
                if event["event"] in ("issued", "skipped") and event["reference"] == frame:
                    break
    finally:
        process.terminate()
        process.wait(timeout=TIMEOUT)
    return events


def summarize(events: list[dict]) -> dict:
    issued = [e for e in events if e["event"] == "issued"]
    latencies = sorted(e["latency_s"] for e in issued)
    p95 = latencies[min(len(latencies) - 1, int(round(0.95 * (len(latencies) - 1))))]
    ratio = [e["wall_s"] / e["work_s"] for e in issued]
    waiting = [e["set_latency_s"] / e["work_s"] for e in issued]
    rss_10, rss_last = issued[9]["rss_mb"], issued[-1]["rss_mb"]
    return {
        "frames": sum(e["event"] == "received" for e in events),
        "nowcasts": len(issued),
        "latency_p50_s": statistics.median(latencies),
        "latency_p95_s": p95,
        "latency_max_s": latencies[-1],
        "work_median_s": statistics.median(e["work_s"] for e in issued),
        "wall_over_work": statistics.median(ratio),
        "completion_to_set_over_work": statistics.median(waiting),
        "rss_after_10_mb": rss_10,
        "rss_after_last_mb": rss_last,
        "rss_ratio": rss_last / rss_10,
        "load_average_1min": os.getloadavg()[0],
    }


def main() -> dict:
    os.environ.setdefault("NOWCAST_DATA_ROOT", str(REPO.parent / "shared/data/pysteps-data"))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-watch-") as tmp:
        events = replay(Path(os.environ["NOWCAST_DATA_ROOT"]), Path(tmp))
    results = {**summarize(events), "replay_s": time.perf_counter() - start}
    save("watch", results)
    r = results
    print(
        f"`nowcast predict --watch` over {r['frames']} BoM frames, {r['nowcasts']} nowcasts, "
        f"load average {r['load_average_1min']:.1f}:"
    )
    rows = [
        ("latency p50 / p95 / max", f"{r['latency_p50_s']:.2f} / {r['latency_p95_s']:.2f} / "
         f"{r['latency_max_s']:.2f} s  (target p95 <= 10 s)"),
        ("work per nowcast (median)", f"{r['work_median_s']:.2f} s"),
        ("wall / work per nowcast", f"{r['wall_over_work']:.2f}x  (target <= 1.3x)"),
        ("completion to set / work (settle and poll)", f"{r['completion_to_set_over_work']:.2f}x"),
        ("RSS after 10 / after the last", f"{r['rss_after_10_mb']:.0f} / "
         f"{r['rss_after_last_mb']:.0f} MiB = {r['rss_ratio']:.2f}x  (target <= 1.1x)"),
    ]  # fmt: skip
    print(table(rows))
    return results


if __name__ == "__main__":
    main()
