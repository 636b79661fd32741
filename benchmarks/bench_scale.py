"""Scale benchmark: cost and peak memory of ingest, patches and evaluate as the archive grows,
and ingest/patch throughput on a real ``dask scheduler`` with one and two ``dask worker``s.

Run with ``python -m benchmarks scale`` (or ``make bench ARGS=scale``). Everything happens in a
temporary folder that is removed at the end:

1. A catalog with one ``synthetic`` source per size (1x, 4x, 16x ``base_frames`` frames of
   ``shape`` pixels at 10 min) and experiment configs for each size.
2. For every size, each stage runs in a fresh ``python`` subprocess through its library entry
   point (:func:`nowcast.sources.ingest.ingest`, :func:`nowcast.patches.build_patches` Eulerian and
   Lagrangian, :func:`nowcast.evaluate.evaluate` with persistence and extrapolation over a test
   split of 80 % of the archive), with the stage's default cluster. The peak RSS of the process
   tree (the stage and its Dask worker processes, :mod:`benchmarks.rss`), the wall time, the
   bytes of the output on disk and the chunk layout of the stores are recorded.
3. A ``dask scheduler`` on 127.0.0.1 and one, then two, ``dask worker --nthreads 1
   --nworkers 1`` processes (spilling to disk disabled); ingest and Eulerian patches of the 4x
   archive run against it with ``scheduler=tcp://...``, after a warm-up task has imported the
   stage modules on every worker (a long-lived cluster). CPU seconds of the stage process, the
   scheduler and the workers say what limits the speed-up on this machine.

Size: ``NOWCAST_SCALE_BASE_FRAMES`` (default 96: 16 h, so the 16x archive is 10.7 days),
``NOWCAST_SCALE_SHAPE`` (default 256 pixels square) and ``NOWCAST_SCALE_FACTORS`` (default
``1,4,16``) override the size for a quick check of the harness. ``NOWCAST_SCALE_REF=HEAD`` (any
git ref) measures that commit, extracted with ``git archive``, instead of the working tree.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
import yaml

from benchmarks.common import save
from benchmarks.dask_processes import WORKER_MEMORY, DaskProcesses, wait_and_warm
from benchmarks.rss import run_measured
from benchmarks.scale_stage import MARKER

STAGES = ("ingest", "patches_eulerian", "patches_lagrangian", "evaluate")
#: Stages measured on the external cluster.
CLUSTER_STAGES = ("ingest", "patches_eulerian")
#: Peak RSS may grow by at most this factor from 1x to 16x the frames.
RSS_GOAL = 1.2
ROOT = Path(__file__).resolve().parent.parent
STAGE_SCRIPT = Path(__file__).resolve().parent / "scale_stage.py"
#: Throughput from one to two workers should grow by at least this factor.
SPEEDUP_GOAL = 1.8
STAGE_TIMEOUT_S = 1800
#: Environment of every Dask process we start: never spill to disk (project rule), so a stage
#: that does not fit shows up as memory, not as disk traffic.
NO_SPILL = {
    "DASK_DISTRIBUTED__WORKER__MEMORY__TARGET": "False",
    "DASK_DISTRIBUTED__WORKER__MEMORY__SPILL": "False",
}


@dataclass(frozen=True)
class ScaleSpec:
    """Size of the benchmark archives."""

    base_frames: int = 96
    shape: int = 256
    factors: tuple[int, ...] = (1, 4, 16)
    timestep: int = 10
    patch_size: int = 128
    stride: int = 64
    # The cluster runs on the longest archive: the stages' fixed costs (cluster connection, grid,
    # size estimate, finalizing) then weigh least against the per-frame work that scales.
    cluster_factor: int = 16

    @classmethod
    def from_env(cls) -> ScaleSpec:
        """Spec with the ``NOWCAST_SCALE_*`` overrides."""
        env = os.environ
        shape = int(env.get("NOWCAST_SCALE_SHAPE", cls.shape))
        factors = tuple(int(f) for f in env.get("NOWCAST_SCALE_FACTORS", "1,4,16").split(","))
        return cls(
            base_frames=int(env.get("NOWCAST_SCALE_BASE_FRAMES", cls.base_frames)),
            shape=shape,
            factors=factors,
            patch_size=min(cls.patch_size, shape // 2),
            stride=min(cls.stride, shape // 4),
            cluster_factor=factors[-1],
        )


def source_name(factor: int) -> str:
    return f"scale_x{factor}"


def write_catalog(folder: Path, spec: ScaleSpec) -> Path:
    """A catalog with one synthetic source per size (same generator, longer archive)."""
    sources = {
        source_name(factor): {
            "description": f"scale benchmark, {factor}x {spec.base_frames} frames",
            "importer": "synthetic",
            "importer_kwargs": {
                "shape": [spec.shape, spec.shape],
                "pixel_size": 1000.0,
                "motion": [2.0, -1.0],
                "seed": 0,
                "start": "2000-01-01T00:00",
                "n_frames": factor * spec.base_frames,
            },
            "timestep": spec.timestep,
        }
        for factor in spec.factors
    }
    path = folder / "catalog.yaml"
    path.write_text(yaml.safe_dump({"sources": sources}, sort_keys=False))
    return path


def write_experiment(folder: Path, spec: ScaleSpec, factor: int, stage: str, catalog: Path) -> Path:
    """Experiment config of ``stage`` on the ``factor`` archive, under ``folder``."""
    name = f"{source_name(factor)}_{stage}"
    patches = {
        "n_input_frames": 6,
        "n_target_frames": 6,
        "patch_size": spec.patch_size,
        "stride": spec.stride,
        "split_fractions": {"train": 0.6, "val": 0.2, "test": 0.2},
        "buffer_minutes": 30,
        "normalization": "log1p",
        "dtype": "float16",
        "frame": "lagrangian" if stage == "patches_lagrangian" else "eulerian",
    }
    experiment = {
        "name": name,
        "sources": [source_name(factor)],
        "catalog": str(catalog),
        "cube_dir": str(folder / "cubes"),
        "patch_dir": str(folder / "patches"),
        "run_dir": str(folder / "runs" / name),
        "patches": patches,
    }
    if stage == "evaluate":
        # A long test period: 80 % of the archive, windows listed from the cube (there is no
        # patch store of this experiment). No figures: they draw a few fixed windows and would
        # hide the per-window cost.
        patches["split_fractions"] = {"train": 0.1, "val": 0.1, "test": 0.8}
        experiment["evaluate"] = {
            "methods": ["persistence", "extrapolation"],
            "figures": False,
            "animate": False,
        }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(experiment, sort_keys=False))
    return path


# --------------------------------------------------------------------------------------------
# measuring


def folder_bytes(path: str | Path) -> int:
    """Bytes of the files under ``path`` (apparent size)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def chunk_layout(store: str) -> dict:
    """Shape, chunks, shards, dtype and codecs of every array of a zarr store (all groups),
    by path, read from the store's metadata."""
    import warnings

    import zarr

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zarr's notice that consolidated metadata is not v3 spec
        group = zarr.open_group(store, mode="r")
        members = group.members(max_depth=None)
    layout = {}
    for name, node in sorted(members):
        if not isinstance(node, zarr.Array):
            continue
        layout[name] = {
            "shape": list(node.shape),
            "chunks": list(node.chunks),
            "shards": list(node.shards) if node.shards else None,
            "dtype": str(node.dtype),
            "compressors": [type(c).__name__ for c in node.compressors],
        }
    return layout


def prepare_code(tmp: Path) -> tuple[Path, dict]:
    """The tree whose ``nowcast`` package the stages run, and what it is.

    With ``NOWCAST_SCALE_REF`` (a git ref) the committed tree of that ref is extracted with
    ``git archive`` into ``tmp``, so the numbers belong to a commit even while others edit the
    working tree; without it the working tree itself is measured and its uncommitted changes
    to ``nowcast/`` are listed.
    """
    ref = os.environ.get("NOWCAST_SCALE_REF")

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=ROOT, check=True, capture_output=True, text=True
        ).stdout.strip()

    if not ref:
        dirty = git("status", "--porcelain", "--", "nowcast").splitlines()
        return ROOT, {"ref": "working tree", "commit": git("rev-parse", "HEAD"), "dirty": dirty}
    code = tmp / "code"
    code.mkdir()
    archive = subprocess.run(["git", "archive", ref], cwd=ROOT, check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(code)], input=archive.stdout, check=True)
    return code, {"ref": ref, "commit": git("rev-parse", ref), "dirty": []}


def stage_env(tmp: Path, code: Path) -> dict:
    """Environment of a stage subprocess and of the Dask processes we start.

    ``nowcast`` is imported from ``code``; temporaries (Dask's scratch space) go under ``tmp``.
    """
    scratch = tmp / "scratch"
    scratch.mkdir(exist_ok=True)
    return {
        **os.environ,
        "PYTHONPATH": str(code),
        "TMPDIR": str(scratch),
        "DASK_TEMPORARY_DIRECTORY": str(scratch),
        **NO_SPILL,
    }


def _machine_busy_s() -> float:
    """CPU seconds all cores of the machine have spent not idle since boot."""
    times = psutil.cpu_times()
    # guest time is already part of user time, steal is the hypervisor's: both left out.
    fields = ("user", "nice", "system", "irq", "softirq")
    return sum(getattr(times, name, 0.0) for name in fields)


def measure_stage(
    stage: str,
    target: str,
    env: dict,
    n_frames: int,
    scheduler: str | None = None,
    extra: dict[str, int] | None = None,
    catalog: Path | None = None,
) -> dict:
    """Run a stage in a fresh subprocess and measure it (``catalog``: ingest's source catalog).

    Returns
    -------
    dict
        ``wall_s`` (process, with imports and cluster start), ``call_s`` (the library call),
        ``peak_rss_bytes``, ``cpu_s`` per process tree, ``bytes_written``, ``n_frames`` and the
        per-frame costs ``s_per_frame`` (``call_s``) and ``bytes_per_frame``.
    """
    argv = [sys.executable, str(STAGE_SCRIPT), stage, target] + ([scheduler] if scheduler else [])
    argv += ["--catalog", str(catalog)] if catalog else []
    load = os.getloadavg()[0]
    busy_before = _machine_busy_s()
    measured = run_measured(
        argv, env=env, extra=extra, timeout=STAGE_TIMEOUT_S, cwd=env["PYTHONPATH"]
    )
    busy = _machine_busy_s() - busy_before
    lines = [line for line in measured.stdout.splitlines() if line.startswith(MARKER)]
    if measured.returncode != 0 or not lines:
        tail = measured.stderr.strip().splitlines()[-5:]
        raise RuntimeError(f"stage {stage} ({target}) failed: {' | '.join(tail)}")
    inner = json.loads(lines[-1][len(MARKER) :])
    written = folder_bytes(inner["output"])
    return {
        **inner,
        "wall_s": measured.wall_s,
        "peak_rss_bytes": measured.peak_rss_bytes,
        "rss_samples": measured.samples,
        "cpu_s": measured.cpu_s,
        # Everything the machine's cores did meanwhile: the part that is not ours is other
        # users' work competing for the same cores.
        "machine_busy_cpu_s": busy,
        "other_cpu_s": max(0.0, busy - sum(measured.cpu_s.values())),
        "load_before": load,
        "bytes_written": written,
        "n_frames": n_frames,
        "s_per_frame": inner["call_s"] / n_frames,
        "bytes_per_frame": written / n_frames,
    }


# --------------------------------------------------------------------------------------------
# archives of growing length


def store_counts(store: str) -> dict | None:
    """The patch store's ``counts`` attribute (windows and samples per split), if it has one."""
    import zarr

    counts = zarr.open_group(store, mode="r").attrs.get("counts")
    return json.loads(counts) if isinstance(counts, str) else counts


def bench_sizes(tmp: Path, spec: ScaleSpec, catalog: Path, env: dict) -> tuple[dict, dict]:
    """Every stage at every size; returns (results per size, chunk layouts of the largest)."""
    sizes, layouts = {}, {}
    for factor in spec.factors:
        n_frames = factor * spec.base_frames
        work = tmp / f"x{factor}"
        work.mkdir()
        row = {}
        target = f"{source_name(factor)}@{work / 'cubes'}"
        row["ingest"] = measure_stage("ingest", target, env, n_frames, catalog=catalog)
        layouts["cube"] = chunk_layout(row["ingest"]["output"])
        for stage in STAGES[1:]:
            config = write_experiment(work, spec, factor, stage, catalog)
            row[stage] = measure_stage(stage, str(config), env, n_frames)
            if stage.startswith("patches"):
                store = row[stage]["output"]
                layouts[f"patch_store_{stage.split('_')[1]}"] = chunk_layout(store)
                row[stage]["counts"] = store_counts(store)
                shutil.rmtree(store)  # keeps the 16x run's disk use to one store at a time
        shutil.rmtree(work)
        sizes[f"x{factor}"] = row
        print(
            f"  {factor:>2}x ({n_frames} frames): "
            + ", ".join(
                f"{s} {r['wall_s']:.0f} s {r['peak_rss_bytes'] / 2**20:.0f} MiB"
                for s, r in row.items()
            ),
            flush=True,
        )
    return sizes, layouts


def growth(sizes: dict, spec: ScaleSpec) -> dict:
    """Peak-RSS ratios to the 1x archive and the marginal per-frame costs, per stage.

    The marginal cost is the slope between the smallest and the largest archive, so the fixed
    cost of a run (interpreter, imports, cluster start, normalization fit) drops out.
    """
    first, last = f"x{spec.factors[0]}", f"x{spec.factors[-1]}"
    out = {}
    for stage in STAGES:
        base = sizes[first][stage]
        ratios = {
            key: row[stage]["peak_rss_bytes"] / base["peak_rss_bytes"]
            for key, row in sizes.items()
            if key != first
        }
        top = sizes[last][stage]
        d_frames = top["n_frames"] - base["n_frames"]
        out[stage] = {
            "peak_rss_ratio": ratios,
            "rss_goal": RSS_GOAL,
            "rss_goal_met": bool(ratios) and ratios[last] <= RSS_GOAL,
            "marginal_s_per_frame": (top["call_s"] - base["call_s"]) / d_frames
            if d_frames
            else None,
            "marginal_bytes_per_frame": (top["bytes_written"] - base["bytes_written"]) / d_frames
            if d_frames
            else None,
        }
    return out


# --------------------------------------------------------------------------------------------
# a real dask scheduler and workers on this machine


def bench_cluster(tmp: Path, spec: ScaleSpec, catalog: Path, env: dict) -> dict:
    """Ingest and Eulerian patches of one archive on 1 and then 2 external workers."""
    factor = spec.cluster_factor
    n_frames = factor * spec.base_frames
    work = tmp / "cluster"
    work.mkdir()
    processes = DaskProcesses(tmp / "dask", env)
    runs = {}
    try:
        address = processes.start_scheduler()
        for n_workers in (1, 2):
            processes.add_worker()
            wait_and_warm(address, n_workers)
            row = {}
            for stage in CLUSTER_STAGES:
                if stage == "ingest":
                    target = f"{source_name(factor)}@{work / 'cubes'}"
                else:
                    target = str(write_experiment(work, spec, factor, stage, catalog))
                row[stage] = measure_stage(
                    stage,
                    target,
                    env,
                    n_frames,
                    scheduler=address,
                    extra=processes.pids(),
                    catalog=catalog,
                )
                row[stage]["frames_per_s"] = n_frames / row[stage]["call_s"]
            runs[f"workers_{n_workers}"] = row
            print(
                f"  {n_workers} worker(s): "
                + ", ".join(f"{s} {r['frames_per_s']:.1f} frames/s" for s, r in row.items()),
                flush=True,
            )
    finally:
        processes.close()
    speedup = {
        stage: runs["workers_2"][stage]["frames_per_s"] / runs["workers_1"][stage]["frames_per_s"]
        for stage in CLUSTER_STAGES
    }
    return {
        "archive": f"x{factor}",
        "n_frames": n_frames,
        "worker_memory_limit": WORKER_MEMORY,
        "cores": len(os.sched_getaffinity(0)),
        "runs": runs,
        "speedup_1_to_2": speedup,
        "speedup_goal": SPEEDUP_GOAL,
        "speedup_goal_met": {stage: value >= SPEEDUP_GOAL for stage, value in speedup.items()},
    }


# --------------------------------------------------------------------------------------------
# the benchmark


def bench(spec: ScaleSpec | None = None) -> dict:
    """Run the scale benchmark in a temporary folder (removed at the end).

    Parameters
    ----------
    spec : ScaleSpec, optional
        Sizes; default :meth:`ScaleSpec.from_env`.

    Returns
    -------
    dict
        ``spec``, ``sizes`` (per ``x<factor>`` and stage: :func:`measure_stage`), ``growth``
        (:func:`growth`), ``layout`` (chunk layouts of the cube and the patch stores) and
        ``cluster`` (:func:`bench_cluster`).
    """
    spec = spec or ScaleSpec.from_env()
    tmp = Path(tempfile.mkdtemp(prefix="nowcast-scale-"))
    try:
        catalog = write_catalog(tmp, spec)
        code, code_info = prepare_code(tmp)
        env = stage_env(tmp, code)
        print(f"scale: {spec}", flush=True)
        sizes, layouts = bench_sizes(tmp, spec, catalog, env)
        cluster = bench_cluster(tmp, spec, catalog, env)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "spec": asdict(spec),
        "code": code_info,
        "pixels_per_frame": spec.shape * spec.shape,
        "sizes": sizes,
        "growth": growth(sizes, spec),
        "layout": layouts,
        "cluster": cluster,
    }


def _mib(value: float) -> str:
    return f"{value / 2**20:.0f}"


def format_table(results: dict) -> str:
    """The printed summary: one line per stage and size, ratios, then the cluster runs."""
    header = (
        f"{'stage':<20}{'size':>5}{'frames':>8}{'wall s':>9}{'call s':>9}{'peak RSS MiB':>14}"
        f"{'written MiB':>13}{'s/frame':>9}{'KiB/frame':>11}"
    )
    lines = [header, "-" * len(header)]
    for stage in STAGES:
        for key, row in results["sizes"].items():
            r = row[stage]
            lines.append(
                f"{stage:<20}{key[1:] + 'x':>5}{r['n_frames']:>8}{r['wall_s']:>9.1f}"
                f"{r['call_s']:>9.1f}{_mib(r['peak_rss_bytes']):>14}{_mib(r['bytes_written']):>13}"
                f"{r['s_per_frame']:>9.3f}{r['bytes_per_frame'] / 1024:>11.1f}"
            )
    lines.append("")
    for stage, g in results["growth"].items():
        ratios = ", ".join(f"{k[1:]}x/1x {v:.2f}" for k, v in g["peak_rss_ratio"].items())
        verdict = "met" if g["rss_goal_met"] else "NOT met"
        marginal = g["marginal_s_per_frame"]
        lines.append(
            f"{stage:<20} peak RSS {ratios} (goal <= {g['rss_goal']:.2f}: {verdict}); marginal "
            + (f"{marginal:.4f} s/frame" if marginal is not None else "-")
        )
    cluster = results["cluster"]
    lines.append("")
    lines.append(
        f"dask scheduler + workers (1 thread each), {cluster['archive'][1:]}x archive "
        f"({cluster['n_frames']} frames), {cluster['cores']} cores:"
    )
    for stage, speedup in cluster["speedup_1_to_2"].items():
        one, two = (cluster["runs"][f"workers_{n}"][stage] for n in (1, 2))
        verdict = "met" if cluster["speedup_goal_met"][stage] else "NOT met"
        lines.append(
            f"{stage:<20} 1 worker {one['frames_per_s']:.1f} frames/s, 2 workers "
            f"{two['frames_per_s']:.1f} frames/s: {speedup:.2f}x (goal >= "
            f"{cluster['speedup_goal']:.1f}x: {verdict})"
        )
        cpu = ", ".join(f"{k} {v:.1f}" for k, v in two["cpu_s"].items())
        lines.append(
            f"{'':<20} 2 workers, CPU s: {cpu}, other processes {two['other_cpu_s']:.1f}; "
            f"{cluster['cores']} cores x {two['wall_s']:.1f} s wall = "
            f"{cluster['cores'] * two['wall_s']:.1f} core-s"
        )
    return "\n".join(lines)


def main() -> dict:
    """Run the benchmark, save ``benchmarks/results/scale.json`` and print the table."""
    results = bench()
    save("scale", results)
    print(format_table(results))
    return results


if __name__ == "__main__":
    main()
