"""PyTorch access to a patch store written by :mod:`nowcast.patches`.

:class:`PatchDataset` cuts its samples out of the store's frames at load time through
:class:`nowcast.patches.PatchStore` (Lagrangian samples are warped there, a whole batch in
one call: the dataset has ``__getitems__``, which ``DataLoader`` calls with a batch of indices).
The zarr arrays are opened lazily in each process that reads from them, so the dataset can be
pickled to ``DataLoader`` workers (fork or spawn) without sharing file handles or zarr's I/O
event loop across processes.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from nowcast.patches.reader import PatchStore
from nowcast.windows import SPLITS


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
        self.store = PatchStore.open(self.store_path)
        self.indices = self.store.samples(split)["sample"].to_numpy()
        self.n_input_frames = self.store.n_input_frames
        self.n_target_frames = self.store.n_target_frames
        self.time_reversal = time_reversal
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Epoch of the coming reads: augmentation is a function of (seed, epoch, sample)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[tuple]:
        """Samples of a batch: cut (and, Lagrangian, warped) together, then augmented one by
        one; ``DataLoader`` calls this with a batch of indices."""
        samples = self.indices[np.asarray(indices, dtype=np.int64)]
        values, valid = self.store.cut(samples)
        return [
            self._augmented(int(sample), values[k], valid[k]) for k, sample in enumerate(samples)
        ]

    def _augmented(self, sample: int, values: np.ndarray, valid: np.ndarray) -> tuple:
        # A pure function of (seed, epoch, sample): identical in any worker, and a resumed run
        # redraws exactly the same augmentation.
        rng = np.random.default_rng([self.seed, self.epoch, sample])
        n_input = self.n_input_frames
        if self.time_reversal and rng.random() < 0.5:
            values, valid = values[::-1], valid[::-1]
        arrays = [values[:n_input], values[n_input:], valid[n_input:]]
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
