"""Training checkpoints: build, save atomically, load safely, rebuild the model for inference.

A checkpoint is a plain dict of tensors and Python scalars, strings, lists and dicts, so that
``torch.load(path, weights_only=True)`` reads it without unpickling arbitrary objects (random
number generator states are converted to tensors for this reason). See :data:`CHECKPOINT_KEYS`
for the schema. The training loop keeps two files in ``<run_dir>/checkpoints/``: ``last.pt``
(written every ``checkpoint_every`` steps, at the end of every epoch and when training stops)
and ``best.pt`` (the lowest validation loss so far).
"""

from __future__ import annotations

import dataclasses
import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from nowcast import __version__, storage
from nowcast.advection.lagrangian import DEFAULT_MOTION_STRIDE
from nowcast.config import ConfigError
from nowcast.models.registry import build_model
from nowcast.patches.normalization import Normalization
from nowcast.patches.reader import PatchStore
from nowcast.sources.cube import cube_pixel_size, open_cube
from nowcast.storage import atomic_write_file
from nowcast.windows import FrameSpec


class CheckpointError(ConfigError):
    """A checkpoint file that cannot be used; the message says why (one line)."""


CHECKPOINT_DIR = "checkpoints"
LAST = "last"
BEST = "best"
#: The pretrained model (``make skill`` reproduces it), package data of ``nowcast.pretrained``:
#: resolved from the package, so it is found in a checkout and in an installed wheel alike.
#: ``nowcast predict`` and ``nowcast evaluate --source`` use it by default.
PRETRAINED_CHECKPOINT = (
    Path(__file__).resolve().parents[1] / "pretrained" / "bom_lagrangian_convlstm.pt"
)
#: The learned ensemble (``make skill ARGS=--ensemble``): the stochastic ConvLSTM of
#: ``pipelines/configs/bom_lagrangian_crps.yaml`` with the noise gain chosen on validation; the
#: ``ensemble`` method and ``nowcast predict --members`` use it by default.
PRETRAINED_ENSEMBLE_CHECKPOINT = PRETRAINED_CHECKPOINT.with_name("bom_lagrangian_crps.pt")

#: Keys of a checkpoint dict.
CHECKPOINT_KEYS = (
    "model_state",
    "optimizer_state",
    "scheduler_state",
    "scaler_state",
    "rng_state",
    "config",
    "experiment",
    "normalization",
    "model_name",
    "model_kwargs",
    "n_input_frames",
    "n_target_frames",
    "timestep_minutes",
    "pixel_size_m",
    "frame",
    "motion_stride",
    "step",
    "epoch",
    "batch_index",
    "best_metric",
    "nowcast_version",
    "torch_version",
)
#: Keys a checkpoint may carry besides :data:`CHECKPOINT_KEYS`: ``provenance`` (a note on how
#: a checkpoint was made where its other keys cannot say it), ``calibration`` (isotonic
#: curves, deprecated: :mod:`nowcast.evaluate.calibration` writes them to a separate file) and
#: ``unseen_radar_matching`` (a model's matching of its forecast on radars it was not trained
#: on, :class:`nowcast.nowcasts.model.ModelNowcast`; see :func:`with_unseen_matching`).
OPTIONAL_CHECKPOINT_KEYS = ("provenance", "calibration", "unseen_radar_matching")
#: The training-state keys that :func:`load_model` leaves out of the metadata it returns.
STATE_KEYS = ("model_state", "optimizer_state", "scheduler_state", "scaler_state", "rng_state")


def checkpoint_path(run_dir: str | os.PathLike, which: str = LAST) -> Path:
    """Return ``<run_dir>/checkpoints/<which>.pt``.

    Parameters
    ----------
    run_dir : str or path-like
        Run folder of an experiment.
    which : {"last", "best"}, optional
        Which checkpoint, by default ``"last"``.

    Returns
    -------
    pathlib.Path
        The checkpoint path.
    """
    if which not in (LAST, BEST):
        raise ValueError(f"unknown checkpoint {which!r}; expected {LAST!r} or {BEST!r}")
    return Path(run_dir) / CHECKPOINT_DIR / f"{which}.pt"


def to_plain(value: Any) -> Any:
    """Convert numpy scalars and arrays (also inside dicts, lists and tuples) to Python objects.

    Parameters
    ----------
    value : object
        Metadata such as normalisation parameters.

    Returns
    -------
    object
        The same structure made of types that ``torch.load(weights_only=True)`` accepts.
    """
    if isinstance(value, Mapping):
        return {str(key): to_plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(item) for item in value]
    if isinstance(value, (np.ndarray, np.generic)):
        return value.tolist()
    return value


@dataclasses.dataclass(frozen=True)
class TrainedOn:
    """What a model was trained on, which inference must reproduce; a checkpoint records it.

    Parameters
    ----------
    normalization : Normalization
        The patch store's normalization.
    frames : FrameSpec
        Input and target frames and their timestep.
    reference_frame : {"eulerian", "lagrangian"}
        ``"lagrangian"``: the model maps inputs advected to the reference time onto targets
        advected back to it (:mod:`nowcast.advection.lagrangian`); inference must do the same.
        Stored under the key ``frame``.
    motion_node_spacing : int
        Pixels between the nodes of the coarse motion a Lagrangian model was trained on;
        inference estimates its motion on the same grid. Stored under ``motion_stride``.
    pixel_size_m : dict
        Source to metres of the training grid; {} when a cube could not be opened.
    """

    normalization: Normalization
    frames: FrameSpec
    reference_frame: str = "eulerian"
    motion_node_spacing: int = DEFAULT_MOTION_STRIDE
    pixel_size_m: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def from_store(cls, store: PatchStore) -> TrainedOn:
        """The record of a patch store, with the pixel sizes of its cubes."""
        return cls(
            normalization=store.normalization,
            frames=store.frame_spec,
            reference_frame=store.reference_frame,
            motion_node_spacing=int(store.attrs.get("motion_stride") or DEFAULT_MOTION_STRIDE),
            pixel_size_m=training_pixel_sizes(store.cube_paths or {}),
        )

    @classmethod
    def from_checkpoint(cls, checkpoint: Mapping) -> TrainedOn:
        """The record of a checkpoint (or of :func:`load_model`'s metadata)."""
        return cls(
            normalization=Normalization.from_dict(checkpoint["normalization"]),
            frames=FrameSpec.from_attrs(checkpoint),
            reference_frame=str(checkpoint["frame"]),
            motion_node_spacing=int(checkpoint["motion_stride"]),
            pixel_size_m=dict(checkpoint["pixel_size_m"]),
        )

    def checkpoint_entries(self) -> dict:
        """The checkpoint keys that hold this record."""
        return {
            "normalization": to_plain(self.normalization.to_dict()),
            **self.frames.to_attrs(),
            "pixel_size_m": to_plain(dict(self.pixel_size_m)),
            "frame": str(self.reference_frame),
            "motion_stride": int(self.motion_node_spacing),
        }


def capture_rng_state() -> dict:
    """Return the state of the torch (CPU and CUDA), numpy and Python random generators.

    Returns
    -------
    dict
        ``torch`` (uint8 tensor), ``cuda`` (list of uint8 tensors, empty without CUDA),
        ``numpy`` (dict with the MT19937 key as an int64 tensor) and ``python`` (dict with the
        Mersenne Twister state as an int64 tensor); loadable with ``weights_only=True``.
    """
    # The legacy global numpy generator is the one that seeding and third-party code use.
    bit_generator, keys, position, has_gauss, cached_gaussian = np.random.get_state()  # noqa: NPY002
    version, internal_state, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "numpy": {
            "bit_generator": bit_generator,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": {
            "version": version,
            "state": torch.tensor(internal_state, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
    }


def restore_rng_state(state: Mapping) -> None:
    """Restore the generators from a :func:`capture_rng_state` dict.

    Parameters
    ----------
    state : mapping
        As returned by :func:`capture_rng_state` (tensors may be on any device).
    """
    torch.set_rng_state(state["torch"].cpu())
    cuda_states = state.get("cuda") or []
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states])
    numpy_state = state["numpy"]
    np.random.set_state(  # noqa: NPY002
        (
            numpy_state["bit_generator"],
            numpy_state["keys"].cpu().numpy().astype(np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    python_state = state["python"]
    random.setstate(
        (
            python_state["version"],
            tuple(int(v) for v in python_state["state"].tolist()),
            python_state["gauss_next"],
        )
    )


def make_checkpoint(
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler_state: dict,
    scaler: torch.amp.GradScaler,
    config: Mapping,
    experiment: str,
    model_name: str,
    model_kwargs: Mapping,
    trained_on: TrainedOn,
    step: int,
    epoch: int,
    batch_index: int,
    best_metric: float,
) -> dict:
    """Assemble the checkpoint dict (see :data:`CHECKPOINT_KEYS`).

    Parameters
    ----------
    model : torch.nn.Module
        The bare model (not wrapped in DistributedDataParallel or ``torch.compile``), so that
        parameter names carry no ``module.`` / ``_orig_mod.`` prefix.
    optimizer : torch.optim.Optimizer
        The optimizer.
    scheduler_state : dict
        State dicts of the learning-rate schedulers (None where unused).
    scaler : torch.amp.GradScaler
        Gradient scaler (its state is empty when disabled).
    config : mapping
        The train config as a plain dict.
    experiment : str
        Experiment name.
    model_name : str
        Registry name of the model.
    model_kwargs : mapping
        Architecture keyword arguments passed to :func:`nowcast.models.build_model`.
    trained_on : TrainedOn
        Normalization, frames, reference frame, motion grid and pixel sizes of the training
        data.
    step : int
        Optimizer steps done.
    epoch : int
        Epoch of the next batch (0-based).
    batch_index : int
        Batches of ``epoch`` already consumed; resuming skips them.
    best_metric : float
        Lowest validation loss so far (inf before the first validation).

    Returns
    -------
    dict
        The checkpoint.
    """
    entries = trained_on.checkpoint_entries()
    return {
        "model_state": model.state_dict(),
        "optimizer_state": optimizer.state_dict(),
        "scheduler_state": scheduler_state,
        "scaler_state": scaler.state_dict(),
        "rng_state": capture_rng_state(),
        "config": to_plain(dict(config)),
        "experiment": experiment,
        "normalization": entries["normalization"],
        "model_name": model_name,
        "model_kwargs": to_plain(dict(model_kwargs)),
        "n_input_frames": entries["n_input_frames"],
        "n_target_frames": entries["n_target_frames"],
        "timestep_minutes": entries["timestep_minutes"],
        "pixel_size_m": entries["pixel_size_m"],
        "frame": entries["frame"],
        "motion_stride": entries["motion_stride"],
        "step": int(step),
        "epoch": int(epoch),
        "batch_index": int(batch_index),
        "best_metric": float(best_metric),
        "nowcast_version": __version__,
        "torch_version": str(torch.__version__),
    }


def training_pixel_sizes(cube_paths: Mapping[str, str]) -> dict[str, float]:
    """Pixel size in metres of each training cube (the patch store's ``cube_paths``).

    Parameters
    ----------
    cube_paths : mapping
        Source name to cube path.

    Returns
    -------
    dict
        Source name to pixel size (metres); a cube that cannot be opened is left out.
    """
    sizes = {}
    for source, path in dict(cube_paths or {}).items():
        try:
            sizes[str(source)] = cube_pixel_size(open_cube(path))
        except (OSError, KeyError, ValueError):
            continue
    return sizes


#: Free space asked for a checkpoint: its tensors' bytes times this, plus
#: :data:`CHECKPOINT_OVERHEAD_BYTES` for the pickled structure, config and metadata.
CHECKPOINT_SPACE_MARGIN = 1.1
CHECKPOINT_OVERHEAD_BYTES = 2**20


def tensor_bytes(value: Any) -> int:
    """Bytes of the tensors in ``value`` and the mappings, lists and tuples inside it."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, Mapping):
        return sum(tensor_bytes(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(item) for item in value)
    return 0


def checkpoint_bytes(checkpoint: Mapping) -> int:
    """Free space a checkpoint asks for: :func:`tensor_bytes` of it (model and optimizer
    states, generator states) times :data:`CHECKPOINT_SPACE_MARGIN`, plus
    :data:`CHECKPOINT_OVERHEAD_BYTES`."""
    return int(tensor_bytes(checkpoint) * CHECKPOINT_SPACE_MARGIN) + CHECKPOINT_OVERHEAD_BYTES


def with_unseen_matching(checkpoint: Mapping, matching: str) -> dict:
    """A copy of ``checkpoint`` that records its matching on radars it was not trained on.

    Parameters
    ----------
    checkpoint : mapping
        A loaded checkpoint.
    matching : str
        ``"none"`` (the key is left out: the model is never matched) or a matching that
        :class:`nowcast.nowcasts.model.ModelNowcast` applies with ``probability_matching="auto"``.

    Returns
    -------
    dict
        The checkpoint with ``unseen_radar_matching`` set or removed.
    """
    state = {key: value for key, value in checkpoint.items() if key != "unseen_radar_matching"}
    if matching != "none":
        state["unseen_radar_matching"] = matching
    return state


def save_checkpoint(path: str | os.PathLike, checkpoint: Mapping) -> None:
    """Write a checkpoint atomically (temporary sibling, then rename).

    Parameters
    ----------
    path : str or path-like
        Destination, e.g. ``<run_dir>/checkpoints/last.pt``.
    checkpoint : mapping
        As built by :func:`make_checkpoint`.

    Raises
    ------
    nowcast.storage.DiskWriteError
        Before writing, if the disk has less free space than :func:`checkpoint_bytes` (the file
        it replaces stays until the new one is complete, so it is not counted as free).
    """
    storage.check_free_space(path, checkpoint_bytes(checkpoint), "checkpoint")
    atomic_write_file(path, lambda tmp: torch.save(dict(checkpoint), tmp))


def load_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device | None = "cpu"
) -> dict:
    """Load a checkpoint with ``torch.load(weights_only=True)`` (no arbitrary unpickling).

    Parameters
    ----------
    path : str or path-like
        Checkpoint file.
    map_location : str or torch.device, optional
        Where tensors are loaded, by default the CPU.

    Returns
    -------
    dict
        The checkpoint.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    CheckpointError
        If the file is empty, unreadable, not a checkpoint dict, or lacks a key of
        :data:`CHECKPOINT_KEYS` (the message says which).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty: not a checkpoint (a write that never finished?)")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for a file it cannot read
        raise CheckpointError(
            f"{path} is not a readable checkpoint (truncated, or not written by torch.save): "
            f"{str(err).splitlines()[0][:200]}"
        ) from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(
            f"{path} holds a {type(checkpoint).__name__}, not a nowcast checkpoint (a dict "
            "written by nowcast.training.checkpoint.make_checkpoint)"
        )
    missing = [key for key in CHECKPOINT_KEYS if key not in checkpoint]
    if missing:
        raise CheckpointError(
            f"{path} lacks the checkpoint keys {', '.join(missing)} "
            "(nowcast.training.checkpoint.CHECKPOINT_KEYS); it was not written by this version "
            "of nowcast.training.checkpoint.make_checkpoint"
        )
    return checkpoint


def check_checkpoint(path: str | os.PathLike) -> dict:
    """Check a checkpoint before any work uses it; return its metadata (as :func:`load_model`).

    The model is rebuilt and its weights loaded on the CPU, so an unusable file (empty,
    truncated, not a checkpoint, missing keys, weights of another architecture) fails here, in
    the calling process, with one line, rather than later in a worker.

    Raises
    ------
    FileNotFoundError, CheckpointError
        As :func:`load_model`.
    """
    return load_model(path, device="cpu")[1]


def load_model(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict]:
    """Rebuild a trained model from a checkpoint for inference.

    Parameters
    ----------
    path : str or path-like
        Checkpoint file (``best.pt`` or ``last.pt``).
    device : str or torch.device, optional
        Device of the model, by default the CPU.

    Returns
    -------
    model : torch.nn.Module
        The model from the registry with the trained weights, in eval mode, on ``device``.
    meta : dict
        The checkpoint without its training states (:data:`STATE_KEYS`): ``model_name``,
        ``model_kwargs``, ``n_input_frames``, ``n_target_frames``, ``timestep_minutes``,
        ``normalization``, ``pixel_size_m``, ``frame``, ``motion_stride``, ``config``,
        ``step``, ``epoch``, ``best_metric``, versions.
    """
    checkpoint = load_checkpoint(path, map_location="cpu")
    model = build_model(
        checkpoint["model_name"],
        checkpoint["n_input_frames"],
        checkpoint["n_target_frames"],
        **checkpoint["model_kwargs"],
    )
    try:
        model.load_state_dict(checkpoint["model_state"])
    except RuntimeError as err:
        raise CheckpointError(
            f"{path}: its weights do not fit model '{checkpoint['model_name']}' with the "
            f"architecture it records (another model or architecture): "
            f"{str(err).splitlines()[0][:200]}"
        ) from None
    model.to(device).eval()
    meta = {key: value for key, value in checkpoint.items() if key not in STATE_KEYS}
    return model, meta
