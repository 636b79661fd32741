"""Fault injection across the commands: kills at every write phase, full and read-only disks,
and bad checkpoints, on a 64 x 64 synthetic pipeline (ingest, patches, two training steps,
evaluate, export, predict) run through typer's CliRunner in the pipeline's own folder.

- A **kill** ends a child process with ``os._exit`` at the n-th ``os.replace`` of the command
  (every rename that commits a file, a zarr chunk, a store, a folder, or half of a swap), so no
  ``except`` or ``finally`` runs, as with kill -9. The children fork from a forkserver that has
  imported the stages once.
- A **full or read-only disk** is an ``OSError`` raised at :func:`nowcast.storage.replace`, the
  commit every artifact passes through (zarr stores, NetCDF, ``torch.save``, JSON); one case
  fills a real tmpfs.

Each case asserts the exit code, a one-line message naming the bad thing, that nothing at a
final path is incomplete, and that a rerun leaves a folder identical to the clean run's (files
compared by bytes; NetCDF by values and attributes; timestamps and throughput masked).
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import BAD_CHECKPOINTS, bad_checkpoint
from typer.testing import CliRunner

from nowcast import storage
from nowcast.cli import EXIT_USER_ERROR, app

CATALOG = """\
sources:
  synthetic:
    importer: synthetic
    timestep: 10
    importer_kwargs: {shape: [64, 64], n_frames: 40, seed: 3, motion: [1.0, 0.5]}
"""

EXPERIMENT = """\
name: cells
sources: [synthetic]
catalog: catalog.yaml
cube_dir: cubes
patch_dir: patches
run_dir: run
patches:
  n_input_frames: 3
  n_target_frames: 2
  patch_size: 32
  stride: 16
  split_fractions: {train: 0.6, val: 0.2, test: 0.2}
  buffer_minutes: 10
  min_wet_fraction: 0.05
  max_samples_per_split: 8
train:
  model: {name: convlstm, kwargs: {patch_factor: 4, hidden_channels: [8], kernel_sizes: 3}}
  max_steps: 2
  batch_size: 4
  log_every: 1
  checkpoint_every: 1
  seed: 0
evaluate: {methods: [persistence, model], figures: false, n_bootstrap: 10, max_windows: 2}
export: {max_forecasts: 3, window_stride_minutes: 10}
"""

#: The pipeline's commands in order, run in its folder (all paths relative).
COMMANDS = {
    "ingest": ["ingest", "synthetic", "--catalog", "catalog.yaml", "--cube-dir", "cubes"],
    "patches": ["patches", "experiment.yaml", "--scheduler", "threads"],
    "train": ["train", "experiment.yaml"],
    "evaluate": ["evaluate", "experiment.yaml", "--scheduler", "threads"],
    "export": ["export", "experiment.yaml"],
    "predict": [
        "predict", "-s", "synthetic", "--catalog", "catalog.yaml", "--cube-dir", "cubes",
        "--checkpoint", "run/checkpoints/best.pt", "--out-dir", "predict",
    ],
}  # fmt: skip

#: What each command completes: anything of these at its final path must be complete.
OUTPUTS = {
    "ingest": ["cubes/synthetic.zarr"],
    "patches": ["patches/cells.zarr"],
    "train": ["run/checkpoints/best.pt", "run/checkpoints/last.pt"],
    "evaluate": ["run/evaluation"],
    "export": ["run/netcdf"],
    "predict": ["predict/synthetic_20000101T0630Z.json"],
}

KILLED = 86  # the child's exit status at the injected kill


# ---- comparing folders ------------------------------------------------------------------------

_TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)?")


def _text(path: Path) -> str:
    text = _TIMESTAMP.sub("<time>", path.read_text())
    if path.name == "train_log.csv":  # throughput is the one value a rerun may change
        rows = list(csv.DictReader(io.StringIO(text)))
        text = json.dumps([{k: v for k, v in row.items() if k != "samples_per_s"} for row in rows])
    return text


def _netcdf(path: Path) -> str:
    import xarray as xr

    with xr.open_dataset(path, engine="netcdf4", decode_times=False) as ds:
        ds = ds.load()
    parts = [_TIMESTAMP.sub("<time>", json.dumps(ds.attrs, sort_keys=True, default=str))]
    for name, var in sorted(ds.variables.items()):
        values = np.ascontiguousarray(var.values)
        digest = hashlib.sha256(values.tobytes()).hexdigest()
        attrs = json.dumps(var.attrs, sort_keys=True, default=str)
        parts.append(f"{name} {var.dims} {values.dtype} {digest} {attrs}")
    return "\n".join(parts)


def _manifest(path: Path) -> str:
    """A predict manifest, its digests checked against the files it lists."""
    manifest = json.loads(path.read_text())
    for name, digest in manifest["files"].items():
        assert storage.file_sha256(path.parent / name) == digest, f"{path}: {name} digest"
    manifest["files"] = sorted(manifest["files"])
    return _TIMESTAMP.sub("<time>", json.dumps(manifest, sort_keys=True))


def _canonical(value) -> str:
    """A checkpoint's content with every tensor as dtype, shape and a digest of its bytes."""
    import torch

    if isinstance(value, torch.Tensor):
        data = value.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        return f"{value.dtype}{tuple(value.shape)}:{hashlib.sha256(data).hexdigest()[:16]}"
    if isinstance(value, dict):
        return (
            "{"
            + ", ".join(
                f"{k!r}: {_canonical(v)}"
                for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))
            )
            + "}"
        )
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_canonical(v) for v in value) + "]"
    return repr(value)


def _checkpoint(path: Path) -> str:
    """A checkpoint by value (``torch.save`` bytes can differ for equal contents); a file that
    does not load (the bad-checkpoint cases put one there) by its bytes."""
    import torch

    try:
        return _canonical(torch.load(path, weights_only=True))
    except Exception:
        return hashlib.sha256(path.read_bytes()).hexdigest()


def tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` (relative path -> comparable content); TensorBoard skipped."""
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() or p.is_symlink()):
        name = path.relative_to(root).as_posix()
        if "tensorboard" in name.split("/"):
            continue
        if path.suffix == ".nc":
            files[name] = _netcdf(path)
        elif path.suffix == ".pt":
            files[name] = _checkpoint(path)
        elif path.suffix == ".json" and path.parent.name == "predict":
            files[name] = _manifest(path)
        elif path.suffix in (".json", ".md", ".csv", ".yaml"):
            files[name] = _text(path)
        else:
            files[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


def _under(files: dict[str, str], prefix: str) -> dict[str, str]:
    return {k: v for k, v in files.items() if k == prefix or k.startswith(prefix + "/")}


# ---- running commands -------------------------------------------------------------------------


def invoke(folder: Path, args: list[str]):
    """Run a command in-process in ``folder``."""
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        return CliRunner().invoke(app, args)
    finally:
        os.chdir(cwd)


def _rerun_args(command: str, folder: Path, prior: bool = False) -> list[str]:
    """The command again; ``--force`` for an ingest over its cube, ``--resume`` for a train
    that has a ``last.pt``."""
    args = list(COMMANDS[command])
    if command == "ingest" and prior:
        args.append("--force")
    if command == "train" and (folder / "run/checkpoints/last.pt").is_file():
        args.append("--resume")  # what the message of a plain rerun tells the user to do
    return args


class Counting:
    """Counts calls of a function it wraps (os.replace, storage.replace)."""

    def __init__(self, function):
        self.function, self.calls = function, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.function(*args, **kwargs)


def _kill_at_replace(folder: str, args: list[str], kill_at: int) -> None:
    """Child process: run ``args`` in ``folder``; ``os._exit`` at the ``kill_at``-th rename
    (``os.replace``, or the atomic exchange that replaces a folder)."""
    calls = [0]

    def killing(real):
        def rename(*a, **k):
            calls[0] += 1
            if calls[0] == kill_at:
                os._exit(KILLED)
            return real(*a, **k)

        return rename

    os.replace = killing(os.replace)
    storage.exchange = killing(storage.exchange)
    os.chdir(folder)
    result = CliRunner().invoke(app, args)
    os._exit(result.exit_code)


def _counting_renames(folder: Path, args: list[str]):
    """Run a command; return its result, its renames (as the kills count them) and commits."""
    renames = Counting(os.replace)
    exchanges = Counting(storage.exchange)
    commits = Counting(storage.replace)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "replace", renames)
        patch.setattr(storage, "exchange", exchanges)
        patch.setattr(storage, "replace", commits)
        result = invoke(folder, args)
    return result, renames.calls + exchanges.calls, commits.calls


@pytest.fixture(scope="module")
def forkserver():
    """A forkserver that has imported the stages once, so each killed child starts at once."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(
        [
            "nowcast.cli",
            "nowcast.sources.ingest",
            "nowcast.patches.build",
            "nowcast.training.loop",
            "nowcast.evaluate.stage",
            "nowcast.export",
            "nowcast.predict",
            "typer.testing",
        ]
    )
    return context


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """The clean pipeline: the folder before each command, after the last, and rename counts."""
    root = tmp_path_factory.mktemp("pipeline")
    work = root / "work"
    work.mkdir()
    (work / "catalog.yaml").write_text(CATALOG)
    (work / "experiment.yaml").write_text(EXPERIMENT)
    before, after, renames, commits = {}, {}, {}, {}
    for command, args in COMMANDS.items():
        before[command] = root / f"before_{command}"
        shutil.copytree(work, before[command])
        result, renames[command], commits[command] = _counting_renames(work, args)
        assert result.exit_code == 0, (command, result.output)
        after[command] = tree(work)
    return {"before": before, "after": after, "final": work, "tree": tree(work),
            "renames": renames, "commits": commits}  # fmt: skip


def _case_folder(pipeline, command: str, tmp_path: Path, prior: bool) -> Path:
    """A copy of the pipeline folder as ``command`` finds it (with its own output if prior)."""
    folder = tmp_path / "case"
    shutil.copytree(pipeline["final"] if prior else pipeline["before"][command], folder)
    return folder


def _kill_points(count: int) -> list[int]:
    """Every rename of a command with few, else four spread from the first to the last."""
    if count <= 5:
        return list(range(1, count + 1))
    return sorted({int(round(x)) for x in np.linspace(1, count, 4)})


def _assert_complete_or_absent(pipeline, command: str, folder: Path, prior: bool) -> None:
    """What a kill leaves at the command's final paths is absent (or the prior output) or
    complete, never partial."""
    from nowcast.training.checkpoint import check_checkpoint

    now = tree(folder)
    for output in OUTPUTS[command]:
        path = folder / output
        if prior:
            assert path.exists(), f"{output}: neither the old nor the new one is there"
        if not path.exists():
            continue
        if command == "train":
            check_checkpoint(path)  # loads: a complete checkpoint of some step
        elif command == "predict":
            _manifest(path)  # a manifest's files are all there, with its digests
        else:
            assert _under(now, output) == _under(pipeline["after"][command], output), output


# ---- the table --------------------------------------------------------------------------------

#: (command, whether its own complete output is there already: the swap of a rerun).
KILL_ROWS = [(command, False) for command in COMMANDS] + [
    ("ingest", True),
    ("evaluate", True),
    ("export", True),
]


def _kill_cases():
    """(command, prior, which kill point) ids; points are resolved against the clean run."""
    return [(command, prior, index) for command, prior in KILL_ROWS for index in range(5)]


@pytest.mark.parametrize(
    "command,prior,index",
    _kill_cases(),
    ids=[f"{c}{'-over-old' if p else ''}-{i}" for c, p, i in _kill_cases()],
)
def test_a_kill_at_each_write_phase_loses_nothing(
    pipeline, forkserver, tmp_path, command, prior, index
):
    args = _rerun_args(command, tmp_path, prior)
    count = pipeline["renames"][command]
    if prior:
        # Over its own output the command ends with a swap: the old output aside, the new in.
        folder = _case_folder(pipeline, command, tmp_path / "count", prior)
        result, count, _ = _counting_renames(folder, args)
        assert result.exit_code == 0, result.output
        points = sorted({max(count - 1, 1), count})
    else:
        points = _kill_points(count)
    if index >= len(points):
        return  # this command has fewer write phases than the table's widest row
    folder = _case_folder(pipeline, command, tmp_path, prior)
    child = forkserver.Process(target=_kill_at_replace, args=(str(folder), args, points[index]))
    child.start()
    child.join(timeout=300)
    assert child.exitcode == KILLED, f"the child ended with {child.exitcode}, not at the kill"

    _assert_complete_or_absent(pipeline, command, folder, prior)
    result = invoke(folder, _rerun_args(command, folder, prior))
    assert result.exit_code == 0, result.output
    assert tree(folder) == (pipeline["tree"] if prior else pipeline["after"][command])


def _disk_error(code: int, fail_at: int):
    """A :func:`storage.replace` that raises ``OSError(code)`` at its ``fail_at``-th call."""
    real = storage.replace
    calls = [0]

    def replace(tmp, final):
        calls[0] += 1
        if calls[0] == fail_at:
            raise OSError(code, os.strerror(code))
        return real(tmp, final)

    return replace


DISK_FAULTS = {errno.ENOSPC: "the disk is full", errno.EROFS: "the file system is read-only"}

#: What a disk error of each command names: the artifact (or a file of its set) being written.
NAMED = {
    "ingest": "cubes/synthetic.zarr",
    "patches": "patches/cells.zarr",
    "train": "run/checkpoints/",
    "evaluate": "run/evaluation",
    "export": "run/netcdf",
    "predict": "predict/synthetic_20000101T0630Z",
}


def _error_line(stderr: str) -> str:
    """The one error line of a failed command (progress bars may come before it, no
    traceback)."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if "error: " in line]
    assert len(errors) == 1, stderr
    assert stderr.rstrip().endswith(errors[0]) and errors[0].startswith("error: "), stderr
    return errors[0]


@pytest.mark.parametrize("code", list(DISK_FAULTS), ids=["full", "read-only"])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_full_or_read_only_disk_is_one_line_and_a_rerun_completes(
    pipeline, tmp_path, monkeypatch, command, code
):
    folder = _case_folder(pipeline, command, tmp_path, prior=False)
    # The full disk stops the last commit (the most work done), the read-only one the first.
    fail_at = pipeline["commits"][command] if code == errno.ENOSPC else 1
    with monkeypatch.context() as patch:
        patch.setattr(storage, "replace", _disk_error(code, fail_at))
        result = invoke(folder, COMMANDS[command])
    assert result.exit_code == EXIT_USER_ERROR, result.output
    line = _error_line(result.stderr)
    assert line.startswith("error: cannot write ") and DISK_FAULTS[code] in line, line
    assert NAMED[command] in line, line
    for output in OUTPUTS[command]:
        if command != "train":  # train's first checkpoints may be complete before the fault
            assert not (folder / output).exists(), output
    result = invoke(folder, _rerun_args(command, folder))
    assert result.exit_code == 0, result.output
    assert tree(folder) == pipeline["after"][command]


#: Where each command reads its checkpoint in the pipeline folder.
CHECKPOINT_COMMANDS = {
    "predict": (COMMANDS["predict"], "run/checkpoints/best.pt"),
    "evaluate": (COMMANDS["evaluate"], "run/checkpoints/best.pt"),
    "export": (COMMANDS["export"], "run/checkpoints/best.pt"),
    "calibrate": (["calibrate", "experiment.yaml"], "run/checkpoints/best.pt"),
    "train --resume": (["train", "experiment.yaml", "--resume"], "run/checkpoints/last.pt"),
}


@pytest.mark.parametrize("kind", list(BAD_CHECKPOINTS))
@pytest.mark.parametrize("command", list(CHECKPOINT_COMMANDS))
def test_every_bad_checkpoint_kind_is_one_line_and_writes_nothing(
    pipeline, tmp_path, command, kind
):
    folder = tmp_path / "case"
    shutil.copytree(pipeline["final"], folder)
    args, relative = CHECKPOINT_COMMANDS[command]
    good = folder / "run/checkpoints/best.pt"
    bad = bad_checkpoint(kind, str(good), tmp_path)
    shutil.copyfile(bad, folder / relative)
    untouched = tree(folder)
    result = invoke(folder, args)
    assert result.exit_code == EXIT_USER_ERROR, result.output
    line = _error_line(result.stderr)
    assert relative in line and BAD_CHECKPOINTS[kind] in line, line
    assert tree(folder) == untouched


def _on_tmpfs(mount: Path, options: str, folder: Path, command: str):
    """Run a shell ``command`` in ``folder`` with a tmpfs mounted at ``mount`` (a private mount
    namespace of an unprivileged user namespace: nothing outside the test sees it)."""
    shell = f"mount -t tmpfs -o {options} tmpfs {mount} || exit 99; cd {folder}; {command}"
    done = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", shell],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    if done.returncode == 99 or "unshare" in done.stderr[:200]:
        # A failure, not a skip: the injected disk faults stand in for these real ones only if
        # the real ones run somewhere, and CI can mount (unprivileged user namespaces).
        pytest.fail(
            "the real full- and read-only-disk cases mount a tmpfs in a private namespace "
            f"(unshare --user --mount), which failed here: {done.stderr.strip()[:200]}",
            pytrace=False,
        )
    return done


def test_a_real_full_disk_is_one_line_and_leaves_nothing(pipeline, tmp_path):
    """Export onto a tmpfs too small for one file, with the free-space guard passed by (so the
    disk fills mid-write, in netCDF's HDF5 layer) and with it (which refuses up front)."""
    folder = tmp_path / "case"
    shutil.copytree(pipeline["final"], folder)
    mount = tmp_path / "small"
    mount.mkdir()
    experiment = (folder / "experiment.yaml").read_text()
    (folder / "experiment.yaml").write_text(
        experiment.replace("export: {", f"export: {{out_dir: {mount}/netcdf, ")
    )
    code = textwrap.dedent(
        """
        import sys
        from nowcast import storage
        if sys.argv[1] == "unguarded":
            storage.check_free_space = lambda *args, **kwargs: None
        from typer.testing import CliRunner
        from nowcast.cli import app
        result = CliRunner().invoke(app, ["export", "experiment.yaml"])
        print(result.exit_code)
        print(result.stderr.strip())
        """
    )
    script = tmp_path / "export_full.py"
    script.write_text(code)
    runs = []
    for guard in ("unguarded", "guarded"):
        command = f"{sys.executable} {script} {guard}; echo LEFT; ls -A {mount}"
        done = _on_tmpfs(mount, "size=8k", folder, command)
        runs.append(done.stdout.strip().splitlines())
    for lines in runs:
        exit_code, message, left = lines[0], lines[1], lines[lines.index("LEFT") + 1 :]
        assert exit_code == str(EXIT_USER_ERROR), lines
        assert message.startswith("error: ") and str(mount) in message, message
        assert left == [], f"left on the full disk: {left}"
    assert "the disk is full" in runs[0][1]
    assert "not enough free disk space" in runs[1][1] and "free" in runs[1][1]


def test_a_real_read_only_folder_is_one_line(pipeline, tmp_path):
    """Predict into a read-only mount (root ignores ``chmod 555``, not a read-only mount)."""
    folder = tmp_path / "case"
    shutil.copytree(pipeline["final"], folder)
    mount = tmp_path / "readonly"
    mount.mkdir()
    args = [*COMMANDS["predict"][:-1], f"{mount}/predict"]
    code = "import sys; from nowcast.cli import main; sys.argv[0] = 'nowcast'; main()"
    done = _on_tmpfs(mount, "ro,size=64k", folder, f'{sys.executable} -c "{code}" {" ".join(args)}')
    assert done.returncode == EXIT_USER_ERROR, done.stderr
    line = _error_line(done.stderr)
    assert str(mount) in line and "read-only" in line, line


#: One fresh process per command: a real stderr and exit status, no CliRunner in between.
FRESH = {
    "data": (["data", "-s", "nosuch"], "unknown source 'nosuch'"),
    "ingest": (["ingest", "nosuch", "--catalog", "catalog.yaml"], "unknown source 'nosuch'"),
    "patches": (["patches", "missing.yaml"], "missing.yaml: file not found"),
    "train": (["train", "experiment.yaml", "--resume"], "cannot resume"),
    "evaluate": (["evaluate", "experiment.yaml"], "is empty"),
    "calibrate": (["calibrate", "experiment.yaml"], "is empty"),
    "export": (["export", "experiment.yaml"], "is empty"),
    "predict": (COMMANDS["predict"], "is empty"),
}


def test_each_command_in_a_fresh_process_fails_with_one_line(pipeline, tmp_path):
    folder = tmp_path / "case"
    shutil.copytree(pipeline["final"], folder)
    (folder / "run/checkpoints/best.pt").write_bytes(b"")
    fresh = tmp_path / "fresh"  # train --resume: a run folder without last.pt
    shutil.copytree(pipeline["before"]["train"], fresh)
    code = "import sys; from nowcast.cli import main; sys.argv[0] = 'nowcast'; main()"
    running = {
        name: subprocess.Popen(
            [sys.executable, "-c", code, *args],
            cwd=fresh if name == "train" else folder,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, (args, _) in FRESH.items()
    }
    for name, process in running.items():
        _, stderr = process.communicate(timeout=300)
        lines = stderr.strip().splitlines()
        assert process.returncode == EXIT_USER_ERROR, (name, stderr)
        assert len(lines) == 1 and lines[0].startswith("error: "), (name, stderr)
        assert FRESH[name][1] in lines[0], (name, lines[0])
