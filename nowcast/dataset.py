"""PyTorch access to a patch store written by :mod:`nowcast.patches`.

:class:`PatchDataset` reads one sample as one chunk of each array it needs (``inputs``,
``targets``, ``target_mask``); the zarr store is opened lazily in each process that reads from
it, so the dataset can be pickled to ``DataLoader`` workers (fork or spawn) without sharing file
handles or zarr's I/O event loop across processes.
"""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import torch
import zarr
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from . import transforms
from .patches import SPLITS

JSON_ATTRS = ("normalization", "splits", "cube_paths", "source_crs", "config", "counts")


def _open_group(store_path: str):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
        return zarr.open_group(str(store_path), mode="r")


def store_info(store_path: str) -> dict:
    """Store attributes, with the JSON-encoded ones decoded.

    Returns
    -------
    dict
        Among others ``n_input_frames``, ``n_target_frames``, ``timestep_minutes``,
        ``patch_size``, ``normalization`` (``{"method", "params", ...}``), ``splits``,
        ``counts`` (``{"windows": {split: n}, "samples": {split: n}}``), ``cube_paths``,
        ``source_crs``, ``config``.
    """
    info = dict(_open_group(store_path).attrs)
    for key in JSON_ATTRS:
        if isinstance(info.get(key), str):
            info[key] = json.loads(info[key])
    return info


def load_normalization(store_path: str):
    """The store's normalization method and its fitted parameters.

    Returns
    -------
    tuple
        ``(transform, params)``: ``transform.inverse(values, params)`` turns network outputs
        (NumPy or torch) back into rain rate in mm/h.
    """
    normalization = store_info(store_path)["normalization"]
    return transforms.get_method(normalization["method"]), normalization["params"]


def dihedral(values: np.ndarray, n_rotations: int, flip: bool) -> np.ndarray:
    """Rotate the last two dimensions by ``n_rotations`` quarter turns, then mirror left-right.

    Returns a view; NumPy rather than torch because ``torch.rot90`` copies and is much slower
    on these small arrays.
    """
    values = np.rot90(values, n_rotations, axes=(-2, -1))
    return values[..., ::-1] if flip else values


class PatchDataset(Dataset):
    """Samples of one split of a patch store.

    Parameters
    ----------
    store_path : str
        Patch store (``<patch_dir>/<experiment>.zarr``).
    split : {"train", "val", "test"}
    augment : bool
        Apply one random flip / quarter-turn rotation per sample, the same to every frame of the
        inputs, the targets and the mask.
    seed : int
        Seed of the augmentation; each sample's flip/rotation is drawn from
        ``(seed, epoch, sample)`` (see :meth:`set_epoch`).
    time_reversal : bool
        With probability 1/2 (drawn like the flips) play the window backwards: its frames
        (inputs then targets) are reversed and split again into ``n_input_frames`` inputs and
        ``n_target_frames`` targets. Growth becomes decay, so a training set dominated by
        growing storms teaches both. Meant for Lagrangian stores, whose frames all sit at one
        reference position.

    Notes
    -----
    ``dataset[i]`` is ``(inputs, targets, target_mask)``: float32 tensors shaped
    ``(n_input_frames, 1, H, W)``, ``(n_target_frames, 1, H, W)`` and
    ``(n_target_frames, 1, H, W)`` (1.0 valid data, 0.0 no data; normalized values are 0 there).
    """

    def __init__(
        self,
        store_path: str,
        split: str,
        augment: bool = False,
        seed: int = 0,
        time_reversal: bool = False,
    ):
        if split not in SPLITS:
            raise ValueError(f"unknown split '{split}'; expected one of {', '.join(SPLITS)}")
        self.store_path = str(store_path)
        self.split = split
        self.augment = augment
        self.seed = seed
        group = _open_group(self.store_path)
        self.indices = np.flatnonzero(np.asarray(group["split"][:]) == split)
        self.n_input_frames = int(group.attrs["n_input_frames"])
        self.n_target_frames = int(group.attrs["n_target_frames"])
        self.time_reversal = time_reversal
        self.epoch = 0
        self._reset()

    def _reset(self) -> None:
        self._pid = None
        self._arrays = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(_pid=None, _arrays=None)
        return state

    def set_epoch(self, epoch: int) -> None:
        """Epoch of the coming reads: augmentation is a function of (seed, epoch, sample)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.indices)

    def _open(self) -> None:
        """Open the arrays once per process (zarr handles are not shared across workers)."""
        group = _open_group(self.store_path)
        names = ("inputs", "targets", "input_mask", "target_mask")
        self._arrays = {name: group[name] for name in names}
        self._pid = os.getpid()

    def __getitem__(self, index: int):
        if self._pid != os.getpid():
            self._open()
        sample = int(self.indices[index])
        # A pure function of (seed, epoch, sample): identical in any worker, and a resumed run
        # redraws exactly the same augmentation.
        rng = np.random.default_rng([self.seed, self.epoch, sample])
        if self.time_reversal and rng.random() < 0.5:
            frames = np.concatenate(
                [self._arrays["inputs"][sample], self._arrays["targets"][sample]]
            )[::-1]
            masks = np.concatenate(
                [self._arrays["input_mask"][sample], self._arrays["target_mask"][sample]]
            )[::-1]
            n_input = self.n_input_frames
            arrays = [frames[:n_input], frames[n_input:], masks[n_input:]]
        else:
            arrays = [self._arrays[name][sample] for name in ("inputs", "targets", "target_mask")]
        if self.augment:
            choice = int(rng.integers(8))
            arrays = [dihedral(array, choice % 4, choice >= 4) for array in arrays]
        # The copy to contiguous float32 also resolves the views' negative strides.
        return tuple(
            torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[:, None]
            for array in arrays
        )


def make_dataloaders(
    store_path: str,
    batch_size: int,
    num_workers: int = 0,
    augment: bool = True,
    distributed: bool = False,
    seed: int = 0,
    time_reversal: bool = False,
) -> dict[str, DataLoader]:
    """Data loaders of the train, val and test splits.

    Parameters
    ----------
    store_path : str
        Patch store.
    batch_size : int
        Samples per batch (per process when ``distributed``).
    num_workers : int
        Loader worker processes; workers persist across epochs when > 0.
    augment : bool
        Random flips and rotations for the train split (never for val and test).
    distributed : bool
        Use a :class:`~torch.utils.data.DistributedSampler` (``torch.distributed`` must be
        initialised); call ``loader.sampler.set_epoch(epoch)`` each epoch.
    seed : int
        Seed of shuffling and augmentation.
    time_reversal : bool
        Time-reversal augmentation for the train split (see :class:`PatchDataset`).

    Returns
    -------
    dict
        ``{"train": DataLoader, "val": DataLoader, "test": DataLoader}``; only train shuffles.
    """
    loaders = {}
    for split in SPLITS:
        shuffle = split == "train"
        dataset = PatchDataset(
            store_path,
            split,
            augment=augment and shuffle,
            seed=seed,
            time_reversal=time_reversal and shuffle,
        )
        sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed) if distributed else None
        loaders[split] = DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle and sampler is None,
            sampler=sampler,
            num_workers=num_workers,
            # Not persistent: workers are re-created each epoch from the dataset, so they see
            # set_epoch (exactly reproducible augmentation) at the cost of a restart per epoch.
            persistent_workers=False,
            pin_memory=torch.cuda.is_available(),
            generator=torch.Generator().manual_seed(seed),
        )
    return loaders
