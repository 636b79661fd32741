"""The command line's error boundary (nowcast.cli): one line and an exit code for what a user
can cause, a traceback for a bug or with ``--debug``."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from typer.testing import CliRunner

from nowcast.cli import EXIT_LOCK_HELD, EXIT_USER_ERROR, app
from nowcast.config import ConfigError

#: A catalog file's problems: (name, file contents or None for a missing file, words the
#: one-line message must hold besides the file's path).
BAD_CATALOGS = [
    ("missing", None, "file not found"),
    ("bad_yaml", "sources: [\n", "invalid YAML"),
    ("not_text", b"\x89PNG\r\n\x1a\n\xff\xfe", "not a text file"),
    ("not_a_mapping", "- just\n- a list\n", "expected a mapping"),
    ("entry_not_a_mapping", "sources:\n  radar: 3\n", "source 'radar': expected a mapping"),
    ("wrong_type", "sources:\n  radar: {importer: synthetic, timestep: ten}\n", "'timestep'"),
    (
        "unknown_key",
        "sources:\n  radar: {importer: synthetic, timestep: 10, colour: red}\n",
        "'colour'",
    ),
    (
        "unknown_top_key",
        "sauces: {}\nsources:\n  radar: {importer: synthetic, timestep: 10}\n",
        "sauces",
    ),
]


def _one_error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.mark.parametrize("name,contents,words", BAD_CATALOGS, ids=[c[0] for c in BAD_CATALOGS])
def test_every_bad_catalog_is_one_line_naming_the_file(tmp_path, name, contents, words):
    path = tmp_path / f"{name}.yaml"
    if isinstance(contents, bytes):
        path.write_bytes(contents)
    elif contents is not None:
        path.write_text(contents)
    out = tmp_path / "cubes"
    result = CliRunner().invoke(
        app, ["ingest", "radar", "--catalog", str(path), "--cube-dir", str(out)]
    )
    assert result.exit_code == EXIT_USER_ERROR, result.output
    line = _one_error_line(result)
    assert str(path) in line and words in line
    assert not out.exists()  # nothing is written for a bad catalog


def test_a_folder_given_as_the_catalog_is_one_line(tmp_path):
    result = CliRunner().invoke(app, ["ingest", "radar", "--catalog", str(tmp_path)])
    assert result.exit_code == EXIT_USER_ERROR
    assert str(tmp_path) in _one_error_line(result)


def test_debug_shows_the_traceback_of_a_user_error(tmp_path):
    missing = tmp_path / "nope.yaml"
    result = CliRunner().invoke(app, ["--debug", "ingest", "radar", "--catalog", str(missing)])
    assert isinstance(result.exception, ConfigError) and str(missing) in str(result.exception)


@pytest.mark.parametrize(
    "args,words",
    [
        (["evaluate"], "exactly one of CONFIG or --source"),
        (["evaluate", "x.yaml", "--start", "2020-01-01"], "--start only apply with --source"),
        (["predict", "-s", "bom", "--no-latest"], "give --at TIME or --latest"),
        (["predict", "-s", "bom", "--calibration", "c.json", "--method", "x"], "--calibration"),
    ],
)
def test_options_that_do_not_go_together_exit_2(args, words):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert words in _one_error_line(result)


def test_unknown_sample_data_source_is_an_error(tmp_path):
    result = CliRunner().invoke(app, ["data", "-s", "nosuch"])
    assert result.exit_code == EXIT_USER_ERROR
    assert "unknown source 'nosuch'" in _one_error_line(result)


def test_a_deliberate_bug_keeps_its_traceback(monkeypatch, small_synthetic_catalog, tmp_path):
    from nowcast.sources import catalog as catalog_module
    from nowcast.sources import ingest as ingest_module

    def broken(*args, **kwargs):
        return {}["no such key"]  # a bug: KeyError is not a user error

    monkeypatch.setattr(catalog_module, "load_catalog", lambda path=None: small_synthetic_catalog)
    monkeypatch.setattr(ingest_module, "ingest", broken)
    result = CliRunner().invoke(app, ["ingest", "synthetic", "--cube-dir", str(tmp_path)])
    assert isinstance(result.exception, KeyError)


def test_a_deliberate_bug_prints_its_traceback_in_a_fresh_process(tmp_path):
    code = textwrap.dedent(
        """
        import sys
        from nowcast.sources import catalog
        def broken(path=None):
            return 1 / 0
        catalog.load_catalog = broken
        from nowcast.cli import main
        sys.argv = ["nowcast", "ingest", "synthetic"]
        main()
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 1
    assert "Traceback" in done.stderr and "ZeroDivisionError" in done.stderr


def test_a_held_lock_exits_3_naming_the_holder(tmp_path, small_synthetic_catalog, monkeypatch):
    import json
    import socket

    from nowcast.sources import catalog as catalog_module

    monkeypatch.setattr(catalog_module, "load_catalog", lambda path=None: small_synthetic_catalog)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = tmp_path / "synthetic.zarr.lock"
        lock.write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid}))
        result = CliRunner().invoke(app, ["ingest", "synthetic", "--cube-dir", str(tmp_path)])
    finally:
        holder.kill()
        holder.wait()
    assert result.exit_code == EXIT_LOCK_HELD, result.output
    line = _one_error_line(result)
    assert str(lock) in line and f"pid {holder.pid}" in line
    assert not (tmp_path / "synthetic.zarr").exists()


@pytest.mark.parametrize("command", ["ingest", "evaluate"])
def test_start_after_end_is_one_line_and_leaves_no_folder(
    command, tmp_path, small_synthetic_catalog, monkeypatch
):
    from nowcast.sources import catalog as catalog_module

    monkeypatch.setattr(catalog_module, "load_catalog", lambda path=None: small_synthetic_catalog)
    cubes, out = tmp_path / "cubes", tmp_path / "report"
    times = ["--start", "2000-01-01T03:00", "--end", "2000-01-01T01:00"]
    args = {
        "ingest": ["ingest", "synthetic", "--cube-dir", str(cubes), *times],
        "evaluate": [
            "evaluate", "--source", "synthetic", "--cube-dir", str(cubes), "--out-dir", str(out),
            *times,
        ],
    }[command]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == EXIT_USER_ERROR, result.output
    line = _one_error_line(result)
    assert "2000-01-01 03:00:00" in line and "2000-01-01 01:00:00" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no empty folders either
