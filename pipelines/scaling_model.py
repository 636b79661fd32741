"""The cost model behind ``docs/scaling.md``: marginal costs, cluster efficiency, the one-year
projection and the loader rate a GPU needs, all computed from the benchmarks' JSON results.

Rendering lives in :mod:`pipelines.scaling_doc`; nothing is measured here.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from nowcast.config import ConfigError

#: One year of 5-minute composites.
YEAR_FRAMES = 365 * 24 * 12
#: Pixels of the projected composite (1000 x 1000).
TARGET_PIXELS = 1000 * 1000
WORKERS = (1, 4, 16, 64)
STAGE_NAMES = {
    "ingest": "ingest",
    "patches_eulerian": "patches, Eulerian",
    "patches_lagrangian": "patches, Lagrangian",
    "evaluate": "evaluate (persistence + extrapolation)",
}


def field(payload: dict, source: str, *keys):
    """``payload[k0][k1]...``, or a one-line :class:`ConfigError` naming the file and field."""
    value = payload
    for depth, key in enumerate(keys):
        try:
            value = value[key]
        except (KeyError, IndexError, TypeError):
            dotted = ".".join(str(k) for k in keys[: depth + 1])
            raise ConfigError(f"{source}: missing field '{dotted}'") from None
    return value


def load_results(path: str | Path) -> dict:
    """A benchmark JSON written by ``benchmarks.common.save`` (the whole payload)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: file not found (run the benchmark first)")
    try:
        payload = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: invalid JSON: {err}") from None
    payload["_source"] = str(path)
    return payload


def marginal_costs(scale: dict) -> dict:
    """Per stage: slope of seconds and bytes per frame between the smallest and largest archive.

    Returns
    -------
    dict
        stage -> ``{first, last, s_per_frame, bytes_per_frame, s_per_frame_per_mpx,
        bytes_per_frame_per_mpx}`` where ``first``/``last`` are the two size rows used.
    """
    source = scale["_source"]
    results = field(scale, source, "results")
    sizes = field(results, source, "sizes")
    keys = list(sizes)
    if len(keys) < 2:
        raise ConfigError(f"{source}: field 'results.sizes' needs at least two archive sizes")
    megapixels = field(results, source, "pixels_per_frame") / 1e6
    out = {}
    for stage in STAGE_NAMES:
        first = field(sizes, source, keys[0], stage)
        last = field(sizes, source, keys[-1], stage)
        frames = last["n_frames"] - first["n_frames"]
        seconds = (last["call_s"] - first["call_s"]) / frames
        n_bytes = (last["bytes_written"] - first["bytes_written"]) / frames
        out[stage] = {
            "first": first,
            "last": last,
            "s_per_frame": seconds,
            "bytes_per_frame": n_bytes,
            "s_per_frame_per_mpx": seconds / megapixels,
            "bytes_per_frame_per_mpx": n_bytes / megapixels,
        }
    return out


def cluster_costs(scale: dict) -> dict:
    """Per clustered stage: seconds per frame of one worker, the 1->2 speed-up and efficiency."""
    source = scale["_source"]
    cluster = field(scale, source, "results", "cluster")
    out = {}
    for stage, speedup in field(cluster, source, "speedup_1_to_2").items():
        one = field(cluster, source, "runs", "workers_1", stage)
        two = field(cluster, source, "runs", "workers_2", stage)
        out[stage] = {
            "one": one,
            "two": two,
            "s_per_frame_1_worker": one["call_s"] / one["n_frames"],
            "speedup": speedup,
            "efficiency": speedup / 2,
        }
    return out


def projection(scale: dict, marginal: dict, cluster: dict) -> dict:
    """Hours per stage on N workers and disk for :data:`YEAR_FRAMES` frames of
    :data:`TARGET_PIXELS` pixels.

    Seconds per frame on one worker come from the 1-worker cluster run, scaled linearly by
    pixels; the Lagrangian store, not run on the cluster, takes the Eulerian one-worker cost
    times the ratio of their marginal costs in the archive runs. N workers divide the time by
    ``N * e`` with ``e`` the measured 1->2 efficiency, capped at 1 (no super-linear scaling is
    projected).
    """
    pixels = field(scale, scale["_source"], "results", "pixels_per_frame")
    pixel_factor = TARGET_PIXELS / pixels
    eulerian = marginal["patches_eulerian"]["s_per_frame"]
    lagrangian = marginal["patches_lagrangian"]["s_per_frame"]
    # A slope at or below zero means the archives were too short to see the per-frame cost.
    lagrangian_factor = lagrangian / eulerian if min(eulerian, lagrangian) > 0 else None
    stages = {}
    for stage in ("ingest", "patches_eulerian", "patches_lagrangian"):
        measured = cluster.get(stage) or cluster["patches_eulerian"]
        s_frame = measured["s_per_frame_1_worker"]
        if stage == "patches_lagrangian" and "patches_lagrangian" not in cluster:
            if lagrangian_factor is None:
                continue
            s_frame *= lagrangian_factor
        efficiency = min(1.0, measured["efficiency"])
        one_worker_h = YEAR_FRAMES * s_frame * pixel_factor / 3600
        stages[stage] = {
            "s_per_frame_1_worker": s_frame,
            "efficiency": efficiency,
            "hours": {n: one_worker_h / (n * efficiency if n > 1 else 1) for n in WORKERS},
        }
    disk = {
        stage: YEAR_FRAMES * marginal[stage]["bytes_per_frame"] * pixel_factor
        for stage in ("ingest", "patches_eulerian", "patches_lagrangian")
    }
    return {
        "pixel_factor": pixel_factor,
        "lagrangian_factor": lagrangian_factor,
        "stages": stages,
        "disk_bytes": disk,
    }


def loader_rates(patches: dict) -> dict[str, dict]:
    """The measured loader rates of ``patches.json``, the run with the most workers per store.

    Reads both layouts of that file: ``results.loader_workers_<n>`` (one store) and
    ``results.<frame>.loader_workers_<n>`` (one entry per Eulerian / Lagrangian store).
    """
    results = field(patches, patches["_source"], "results")
    cores = field(patches, patches["_source"], "machine", "cpus")
    groups = {"patch store": results}
    groups.update({k: v for k, v in results.items() if k in ("eulerian", "lagrangian")})
    rates = {}
    for label, group in groups.items():
        runs = {
            int(key.rsplit("_", 1)[1]): value["samples_per_s"]
            for key, value in group.items()
            if re.fullmatch(r"loader_workers_\d+", key)
        }
        if runs:
            workers = max(runs)
            # Workers beyond the cores share them: the rate is per core actually used.
            used = max(1, min(workers, cores))
            rates[label] = {"workers": workers, "cores": used, "rate": runs[workers]}
            rates[label]["per_core"] = runs[workers] / used
    if not rates:
        raise ConfigError(f"{patches['_source']}: no 'loader_workers_<n>' results")
    return rates


def loader_need(gpu: dict | None, patches: dict | None) -> dict | None:
    """Samples/s the fastest measured GPU training step consumes vs the measured loader rates."""
    if gpu is None or patches is None:
        return None
    step = field(gpu, gpu["_source"], "train_step")
    variants = field(step, gpu["_source"], "variants")
    name = min(variants, key=lambda k: variants[k]["median_step_s"])
    batch = step["batch_size"]
    need = batch / variants[name]["median_step_s"]
    rates = loader_rates(patches)
    for rate in rates.values():
        rate["cores_needed"] = math.ceil(need / rate["per_core"])
    return {
        "variant": name,
        "batch": batch,
        "step_s": variants[name]["median_step_s"],
        "need": need,
        "gpu_shape": (step["patch_size"], step["n_input_frames"], step["n_target_frames"]),
        "loader_shape": tuple(
            field(patches, patches["_source"], "results", "patches", key)
            for key in ("patch_size", "n_input_frames", "n_target_frames")
        ),
        "loader_created": patches.get("created", "?"),
        "rates": rates,
    }


# --------------------------------------------------------------------------------------------
# the document
