"""The package as a user installs it: package data, the checkpoint schema, a wheel that works.

The wheel test builds the wheel offline from a copy of the package sources (so the checkout gets
no ``build/`` folder), installs it with ``--no-deps --target`` outside the checkout and runs
``nowcast predict`` from an empty folder with only ``NOWCAST_DATA_ROOT`` (and ``PYTHONPATH``
naming the install) set.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import xarray as xr
import yaml
from conftest import REPO
from test_predict import residual_checkpoint

from nowcast.sources.catalog import PACKAGED_CATALOG
from nowcast.sources.sample_data import REGISTRY_FILE
from nowcast.storage import file_sha256
from nowcast.training.checkpoint import (
    CHECKPOINT_KEYS,
    OPTIONAL_CHECKPOINT_KEYS,
    PRETRAINED_CHECKPOINT,
    PRETRAINED_ENSEMBLE_CHECKPOINT,
    load_checkpoint,
    load_model,
)

ARCHITECTURE = REPO / "docs" / "architecture.md"
PACKAGE = REPO / "nowcast"
#: The files the package reads from itself; the wheel must carry them.
PACKAGE_DATA = (
    PACKAGED_CATALOG,
    REGISTRY_FILE,
    PRETRAINED_CHECKPOINT,
    PRETRAINED_ENSEMBLE_CHECKPOINT,
)
#: What ``pip wheel .`` reads from the checkout.
WHEEL_SOURCES = ("pyproject.toml", "README.md", "nowcast")


def test_the_packaged_catalog_is_the_top_level_one():
    assert PACKAGED_CATALOG.read_bytes() == (REPO / "data_catalog.yaml").read_bytes(), (
        "copy data_catalog.yaml to nowcast/data_catalog.yaml (the wheel's default catalog)"
    )


def test_the_package_data_lies_in_the_package():
    for path in PACKAGE_DATA:
        assert path.is_file() and path.resolve().is_relative_to(PACKAGE), path


def documented_checkpoint_keys() -> list[str]:
    """The keys named in the first column of the checkpoint table of docs/architecture.md."""
    text = ARCHITECTURE.read_text()
    section = text[text.index("### Checkpoint (") :]
    section = section[: section.index("\n### ", 1)]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return [key for row in rows for key in re.findall(r"`([a-z_]+)`", row.split("|")[1])]


def test_the_checkpoint_table_documents_exactly_the_checkpoint_keys():
    documented = documented_checkpoint_keys()
    assert len(documented) == len(set(documented))
    assert set(documented) == set(CHECKPOINT_KEYS) | set(OPTIONAL_CHECKPOINT_KEYS)


def test_make_checkpoint_writes_exactly_the_checkpoint_keys(tmp_path):
    written = torch.load(residual_checkpoint(tmp_path / "model.pt"), weights_only=True)
    assert tuple(written) == CHECKPOINT_KEYS


def test_the_pretrained_checkpoint_has_the_whole_schema():
    checkpoint = load_checkpoint(PRETRAINED_CHECKPOINT)  # refuses a missing key
    assert "provenance" in checkpoint
    assert set(checkpoint) - set(CHECKPOINT_KEYS) <= {"provenance", "unseen_radar_matching"}
    # make skill ARGS=--unseen chose its matching on held-out radars and says so.
    matching = checkpoint.get("unseen_radar_matching", "none")
    assert matching in ("none", "cdf", "mean")
    assert f"Off its training radar it is matched with '{matching}'" in checkpoint["provenance"]
    # The coarse motion grid its scores use; it was trained on full-resolution motion.
    assert checkpoint["frame"] == "lagrangian" and checkpoint["motion_stride"] == 8
    assert "full resolution" in checkpoint["provenance"]
    assert checkpoint["pixel_size_m"] == {"bom": 500.0}


def test_the_packaged_ensemble_is_a_stochastic_model_with_its_chosen_gain():
    checkpoint = load_checkpoint(PRETRAINED_ENSEMBLE_CHECKPOINT)  # refuses a missing key
    assert set(checkpoint) - set(CHECKPOINT_KEYS) <= {"provenance", "unseen_radar_matching"}
    assert checkpoint["model_name"] == "stochastic_convlstm"
    # make skill chose the matching on unseen radars on held-out radars and says so.
    matching = checkpoint.get("unseen_radar_matching", "none")
    assert matching in ("none", "cdf")
    assert f"matching '{matching}' on radars it was not trained on" in checkpoint["provenance"]
    # make skill chose the gain on the validation windows and says so.
    gain = checkpoint["model_kwargs"]["noise_gain"]
    assert f"noise_gain {gain:g} chosen on the BoM validation windows" in checkpoint["provenance"]
    model, _ = load_model(PRETRAINED_ENSEMBLE_CHECKPOINT)
    assert model.stochastic and model.noise_gain == gain and not model.training


def test_the_packaged_ensemble_kept_the_training_budget():
    """Issue 22's budget: bom_lagrangian_tr's 600 steps and 12 minutes, and at most 8 forecaster
    sequences (samples x members) per step, in the config and in the shipped checkpoint."""
    config = yaml.safe_load((REPO / "pipelines/configs/bom_lagrangian_crps.yaml").read_text())
    recorded = load_checkpoint(PRETRAINED_ENSEMBLE_CHECKPOINT)["config"]
    for train in (config["train"], recorded):
        assert train["batch_size"] * train["members"] <= 8
        assert train["members"] >= 2 and train["max_steps"] <= 600 and train["max_minutes"] <= 12
    # The checkpoint is the config's training.
    for key in ("batch_size", "members", "max_steps", "loss", "model"):
        assert recorded[key] == config["train"][key], key


@pytest.mark.realdata
def test_the_resave_script_finds_the_pretrained_checkpoint_up_to_date(data_root, capsys):
    from pipelines.resave_pretrained import main

    assert main(["--check"]) == 0
    assert "up to date" in capsys.readouterr().out


def run(args: list, **kwargs) -> subprocess.CompletedProcess:
    """Run a command; on failure the assertion shows its output."""
    result = subprocess.run(args, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{args}:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.mark.realdata
@pytest.mark.slow
def test_the_wheel_installs_and_predicts_from_an_empty_folder(data_root, tmp_path):
    sources = tmp_path / "sources"
    sources.mkdir()
    for name in WHEEL_SOURCES:
        if (REPO / name).is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
            shutil.copytree(REPO / name, sources / name, ignore=ignore)
        else:
            shutil.copy2(REPO / name, sources / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "-q"]
    run([*pip, "wheel", ".", "--no-deps", "--no-build-isolation", "-w", tmp_path], cwd=sources)
    (wheel,) = tmp_path.glob("nowcast-*.whl")
    target = tmp_path / "site"
    run([*pip, "install", "--no-deps", "--no-index", "--target", target, wheel])

    empty = tmp_path / "work"
    empty.mkdir()
    env = {
        "PATH": os.environ["PATH"],
        "PYTHONPATH": str(target),
        "NOWCAST_DATA_ROOT": str(data_root),
    }
    where = run(
        [sys.executable, "-c", "import nowcast; print(nowcast.__file__)"], cwd=empty, env=env
    )
    assert Path(where.stdout.strip()).is_relative_to(target)
    for path in PACKAGE_DATA:
        installed = target / "nowcast" / path.resolve().relative_to(PACKAGE)
        assert file_sha256(installed) == file_sha256(path), installed
    packaged = target / "nowcast" / "pretrained" / PRETRAINED_CHECKPOINT.name

    command = [target / "bin" / "nowcast", "predict", "--source", "bom", "--from-files"]
    run([*command, "--at", "2020-10-31T09:50"], cwd=empty, env=env)
    (netcdf,) = (empty / "runs" / "predict").glob("*.nc")
    with xr.open_dataset(netcdf) as written:
        assert written["precip_intensity"].sizes["lead_time"] == 6
        assert written.attrs["model_checkpoint_sha256"] == file_sha256(packaged)
