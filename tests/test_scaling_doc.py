"""docs/scaling.md is generated from the benchmark results: every number traces to the JSON."""

from __future__ import annotations

import copy
import json

import pytest

from nowcast.config import ConfigError
from pipelines import scaling_doc

STAGES = ("ingest", "patches_eulerian", "patches_lagrangian", "evaluate")
MIB = 2**20


def _stage(n_frames: int, call_s: float, rss_mib: float, written_mib: float) -> dict:
    return {
        "n_frames": n_frames,
        "call_s": call_s,
        "wall_s": call_s + 3.0,
        "peak_rss_bytes": rss_mib * MIB,
        "bytes_written": written_mib * MIB,
        "s_per_frame": call_s / n_frames,
        "bytes_per_frame": written_mib * MIB / n_frames,
        "other_cpu_s": 1.3,
    }


def _cluster_run(n_frames: int, call_s: float, workers: int) -> dict:
    cpu = {"command": 2.0, "scheduler": 0.5}
    cpu.update({f"worker{i + 1}": call_s * 0.8 for i in range(workers)})
    return {
        "n_frames": n_frames,
        "call_s": call_s,
        "wall_s": call_s + 2.0,
        "frames_per_s": n_frames / call_s,
        "cpu_s": cpu,
        "other_cpu_s": 1.5,
    }


def fake_scale() -> dict:
    """A scale.json payload: 100 x 100 pixels, 1x and 4x a base of 50 frames."""
    sizes = {
        "x1": {stage: _stage(50, 10.0, 500.0, 5.0) for stage in STAGES},
        "x4": {stage: _stage(200, 40.0, 550.0, 17.0) for stage in STAGES},
    }
    sizes["x4"]["patches_lagrangian"] = _stage(200, 70.0, 560.0, 20.0)
    cluster_runs = {
        "workers_1": {s: _cluster_run(200, 20.0, 1) for s in ("ingest", "patches_eulerian")},
        "workers_2": {s: _cluster_run(200, 12.5, 2) for s in ("ingest", "patches_eulerian")},
    }
    layout = {
        "shape": [200, 100, 100],
        "chunks": [6, 100, 100],
        "shards": None,
        "dtype": "float32",
        "compressors": ["ZstdCodec"],
    }
    return {
        "benchmark": "scale",
        "created": "2026-01-01T00:00:00+00:00",
        "machine": {"cpus": 2},
        "results": {
            "spec": {
                "base_frames": 50,
                "shape": 100,
                "factors": [1, 4],
                "timestep": 10,
                "patch_size": 50,
                "stride": 25,
            },
            "code": {"ref": "HEAD", "commit": "0123456789abcdef", "dirty": []},
            "pixels_per_frame": 10_000,
            "sizes": sizes,
            "growth": {stage: {"rss_goal": 1.2} for stage in STAGES},
            "layout": {"cube": {"rain_rate": layout}},
            "cluster": {
                "archive": "x4",
                "n_frames": 200,
                "cores": 2,
                "worker_memory_limit": "4GiB",
                "runs": cluster_runs,
                "speedup_1_to_2": {"ingest": 1.6, "patches_eulerian": 1.6},
                "speedup_goal": 1.8,
            },
        },
    }


def fake_gpu() -> dict:
    return {
        "train_step": {
            "batch_size": 8,
            "patch_size": 128,
            "n_input_frames": 6,
            "n_target_frames": 6,
            "variants": {"slow": {"median_step_s": 0.04}, "fast": {"median_step_s": 0.02}},
        }
    }


def fake_patches() -> dict:
    return {
        "created": "2026-01-02",
        "machine": {"cpus": 2},
        "results": {
            "patches": {"patch_size": 128, "n_input_frames": 6, "n_target_frames": 6},
            "eulerian": {
                "loader_workers_0": {"samples_per_s": 60.0},
                "loader_workers_4": {"samples_per_s": 100.0},
            },
            "lagrangian": {"loader_workers_1": {"samples_per_s": 10.0}},
        },
    }


def _render(tmp_path, scale: dict, gpu: dict | None = None, patches: dict | None = None) -> str:
    paths = {}
    for name, payload in (("scale", scale), ("gpu", gpu), ("patches", patches)):
        if payload is not None:
            paths[name] = tmp_path / f"{name}.json"
            paths[name].write_text(json.dumps(payload))
    out = scaling_doc.write_doc(
        paths["scale"], tmp_path / "scaling.md", paths.get("patches"), paths.get("gpu")
    )
    return out.read_text()


def _ingest_hours(s_per_frame_1_worker: float, workers: int, efficiency: float) -> float:
    # 1000 x 1000 pixels over 100 x 100: 100 times the pixels of a measured frame.
    one = scaling_doc.YEAR_FRAMES * s_per_frame_1_worker * 100 / 3600
    return one if workers == 1 else one / (workers * efficiency)


def test_projection_follows_the_measured_cluster_cost(tmp_path):
    scale = fake_scale()
    text = _render(tmp_path, scale)
    # 20 s for 200 frames on one worker; efficiency 1.6 / 2.
    assert scaling_doc.num(_ingest_hours(0.1, 1, 0.8)) in text  # 292 h
    assert scaling_doc.num(_ingest_hours(0.1, 16, 0.8)) in text
    assert "20.0 / 200 = 0.100" in text

    changed = copy.deepcopy(scale)
    changed["results"]["cluster"]["runs"]["workers_1"]["ingest"]["call_s"] = 30.0
    text = _render(tmp_path, changed)
    assert "30.0 / 200 = 0.150" in text
    hours = " | ".join(scaling_doc.num(_ingest_hours(0.15, n, 0.8)) for n in (1, 4, 16, 64))
    assert f"| ingest | 0.150 | 0.800 | {hours} |" in text  # 438 h on one worker
    assert "| ingest | 0.100 |" not in text


def test_marginal_cost_and_disk_are_slopes_between_sizes(tmp_path):
    text = _render(tmp_path, fake_scale())
    # Eulerian: (40 - 10) s / (200 - 50) frames; Lagrangian (70 - 10) / 150: twice the slope.
    assert "(40.0 - 10.0) / (200 - 50) = 0.200" in text
    assert "(70.0 - 10.0) / (200 - 50) = 0.400" in text
    assert "0.400 / 0.200 = 2.00" in text
    # Cube: (17 - 5) MiB / 150 frames = 81.9 KiB per frame, x 100 pixels x one year.
    per_frame = 12 * MIB / 150
    disk = per_frame * 100 * scaling_doc.YEAR_FRAMES / 2**30
    assert f"{scaling_doc.num(per_frame / 1024)} KiB x 100 x" in text
    assert f"= {scaling_doc.num(disk)} GiB" in text


@pytest.mark.parametrize(("rss_4x", "verdict"), [(590.0, "met"), (610.0, "**not met**")])
def test_memory_goal_is_judged_on_the_measured_ratio(tmp_path, rss_4x, verdict):
    scale = fake_scale()
    scale["results"]["sizes"]["x4"]["ingest"]["peak_rss_bytes"] = rss_4x * MIB
    text = _render(tmp_path, scale)
    memory = text.split("## Peak memory")[1].split("##")[0]
    row = next(line for line in memory.splitlines() if line.startswith("| ingest | "))
    assert f"{scaling_doc.num(rss_4x)} / 500 = {scaling_doc.num(rss_4x / 500)}" in row
    assert row.endswith(f"<= 1.20: {verdict} |")


def test_speedup_verdict_and_cpu_shares(tmp_path):
    text = _render(tmp_path, fake_scale())
    assert "16.0 / 10.0 = 1.60 (>= 1.80: **not met**)" in text
    # 2 cores x (12.5 + 2) s wall = 29 core-s; workers 2 x 0.8 x 12.5 = 20 of them.
    assert "2 cores x 14.5 s = 29.0 core-s, of which workers 20.0 (69.0 %)" in text


def test_loader_need_uses_the_fastest_gpu_step(tmp_path):
    text = _render(tmp_path, fake_scale(), fake_gpu(), fake_patches())
    # batch 8 / 0.02 s = 400 samples/s; 100 samples/s from 4 workers on 2 cores = 50 per core.
    assert "`fast`): batch 8 / 0.0200 s per step = 400 samples/s" in text
    assert "eulerian: 100 samples/s with 4 loader workers on 2 core(s)" in text
    assert "400 / 50.0 -> 8 cores" in text
    assert "lagrangian: 10.0 samples/s with 1 loader workers on 1 core(s)" in text
    assert "400 / 10.0 -> 40 cores" in text


def test_missing_field_is_a_one_line_error_naming_file_and_field(tmp_path):
    scale = fake_scale()
    del scale["results"]["cluster"]
    with pytest.raises(ConfigError, match=r"scale\.json: missing field 'results\.cluster'"):
        _render(tmp_path, scale)


def test_cli_reports_a_missing_results_file(tmp_path, capsys):
    code = scaling_doc.main(["--scale", str(tmp_path / "none.json"), "--out", str(tmp_path / "x")])
    assert code == 1
    assert "none.json: file not found" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_stage_table_shows_the_measured_run_and_the_contention(tmp_path):
    text = _render(tmp_path, fake_scale())
    stages = text.split("## Every stage")[1].split("##")[0]
    # 1x ingest: call 10 s, wall 13 s, 500 MiB, 5 MiB, 0.2 s and 102 KiB per frame;
    # others used 1.3 of 2 cores x 13 s = 5 %.
    assert "| ingest | 1x | 50 | 10.0 | 13.0 | 500 | 5.00 | 0.200 | 102 | 5.00 |" in stages
