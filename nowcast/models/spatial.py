"""Spatial handling shared by the models: input checks, padding to a multiple, tiling.

The ConvLSTM is fully convolutional and only needs its grid padded to a multiple of its
space-to-depth (and downsampling) factor. The CNN-LSTM and FC-LSTM flatten a tile into a vector,
which fixes the spatial size they can read; :class:`TiledSequenceModel` lets them predict a full
composite of any size by running tile by tile.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

PAD_MODES = ("replicate", "reflect")


def check_sequence_input(frames: torch.Tensor, n_input_frames: int, in_channels: int) -> None:
    """Check that ``frames`` has the model-contract shape (batch, n_input_frames, channels, y, x).

    Parameters
    ----------
    frames : torch.Tensor
        Model input.
    n_input_frames : int
        Number of input frames the model was built for.
    in_channels : int
        Number of channels the model was built for.

    Raises
    ------
    ValueError
        If the rank, the number of frames or the number of channels is wrong.
    """
    if frames.ndim != 5:
        raise ValueError(
            f"expected input of shape (batch, n_input_frames, channels, height, width), "
            f"got {tuple(frames.shape)}"
        )
    if frames.shape[1] != n_input_frames:
        raise ValueError(f"expected {n_input_frames} input frames, got {frames.shape[1]}")
    if frames.shape[2] != in_channels:
        raise ValueError(f"expected {in_channels} channels, got {frames.shape[2]}")


def pad_to_multiple(
    images: torch.Tensor, multiple: int, mode: str = "replicate"
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad the last two dimensions at the bottom/right up to a multiple of ``multiple``.

    Parameters
    ----------
    images : torch.Tensor
        Tensor of shape (N, C, height, width).
    multiple : int
        The padded height and width are the smallest multiples of this value that are not smaller
        than the original ones.
    mode : {"replicate", "reflect"}, optional
        Padding mode passed to :func:`torch.nn.functional.pad`. ``"reflect"`` requires the padding
        to be smaller than the image size.

    Returns
    -------
    padded : torch.Tensor
        Padded tensor (``images`` itself when no padding is needed).
    original_size : tuple of int
        ``(height, width)`` before padding, for cropping back.
    """
    if mode not in PAD_MODES:
        raise ValueError(f"unknown pad mode {mode!r}; expected one of {PAD_MODES}")
    height, width = images.shape[-2:]
    pad_bottom = -height % multiple
    pad_right = -width % multiple
    if pad_bottom or pad_right:
        images = F.pad(images, (0, pad_right, 0, pad_bottom), mode=mode)
    return images, (height, width)


def _tiled_length(length: int, tile_size: int, stride: int) -> int:
    """Smallest length >= ``length`` covered exactly by tiles of ``tile_size`` at ``stride``."""
    if length <= tile_size:
        return tile_size
    return tile_size + math.ceil((length - tile_size) / stride) * stride


def _apply_in_chunks(
    tile_fn: Callable[[torch.Tensor], torch.Tensor], tiles: torch.Tensor, chunk_size: int | None
) -> torch.Tensor:
    if chunk_size is None or tiles.shape[0] <= chunk_size:
        return tile_fn(tiles)
    return torch.cat([tile_fn(chunk) for chunk in tiles.split(chunk_size)], dim=0)


def apply_tiled(
    tile_fn: Callable[[torch.Tensor], torch.Tensor],
    frames: torch.Tensor,
    tile_size: int,
    tile_overlap: int = 0,
    tile_batch_size: int | None = None,
    pad_mode: str = "replicate",
) -> torch.Tensor:
    """Apply a fixed-size sequence model tile by tile over a grid of any size.

    The grid is padded (bottom/right) so that tiles of ``tile_size`` at stride
    ``tile_size - tile_overlap`` cover it exactly; every tile of every batch member goes through
    ``tile_fn`` as one batch; the predicted tiles are put back in place, overlapping pixels are
    averaged, and the padding is cropped. Everything is differentiable.

    Parameters
    ----------
    tile_fn : callable
        Maps tiles of shape (n_tiles, T_in, C, tile_size, tile_size) to predictions of shape
        (n_tiles, T_out, C, tile_size, tile_size).
    frames : torch.Tensor
        Input of shape (batch, T_in, C, height, width).
    tile_size : int
        Side of the square tiles.
    tile_overlap : int, optional
        Overlap between neighbouring tiles in pixels (0 = non-overlapping), by default 0.
    tile_batch_size : int or None, optional
        Largest number of tiles passed to ``tile_fn`` at once (bounds memory on large
        composites); None passes all tiles at once.
    pad_mode : {"replicate", "reflect"}, optional
        How the grid is padded up to the tiled size, by default ``"replicate"``.

    Returns
    -------
    torch.Tensor
        Prediction of shape (batch, T_out, C, height, width).
    """
    if not 0 <= tile_overlap < tile_size:
        raise ValueError(f"tile_overlap must be in [0, {tile_size}), got {tile_overlap}")
    batch, n_input_frames, channels, height, width = frames.shape
    stride = tile_size - tile_overlap
    padded_height = _tiled_length(height, tile_size, stride)
    padded_width = _tiled_length(width, tile_size, stride)
    images = frames.reshape(batch, n_input_frames * channels, height, width)
    if (padded_height, padded_width) != (height, width):
        images = F.pad(images, (0, padded_width - width, 0, padded_height - height), mode=pad_mode)

    # unfold lays each tile out as (T*C, tile, tile) flattened along dim 1, tiles along dim 2.
    columns = F.unfold(images, tile_size, stride=stride)
    n_tiles = columns.shape[-1]
    tiles = (
        columns.reshape(batch, n_input_frames, channels, tile_size, tile_size, n_tiles)
        .permute(0, 5, 1, 2, 3, 4)
        .reshape(batch * n_tiles, n_input_frames, channels, tile_size, tile_size)
    )
    predicted = _apply_in_chunks(tile_fn, tiles, tile_batch_size)
    n_target_frames, out_channels = predicted.shape[1:3]
    predicted_columns = predicted.reshape(batch, n_tiles, -1).permute(0, 2, 1)
    output_size = (padded_height, padded_width)
    merged = F.fold(predicted_columns, output_size, tile_size, stride=stride)
    if tile_overlap:
        ones = predicted_columns.new_ones(1, tile_size * tile_size, n_tiles)
        merged = merged / F.fold(ones, output_size, tile_size, stride=stride)
    merged = merged[..., :height, :width]
    return merged.reshape(batch, n_target_frames, out_channels, height, width)


class TiledSequenceModel(nn.Module):
    """Base class for models that read a fixed tile size and predict full grids tile by tile.

    Subclasses implement :meth:`forward_tiles`; :meth:`forward` checks the input and applies it
    with :func:`apply_tiled`, so on inputs of exactly ``tile_size`` it is a single tile.

    Parameters
    ----------
    n_input_frames : int
        Number of past frames read.
    n_target_frames : int
        Number of future frames predicted.
    in_channels : int
        Channels per frame.
    tile_size : int
        Side of the square tile the network reads.
    tile_overlap : int, optional
        Overlap between tiles on larger grids (averaged), by default 0.
    tile_batch_size : int or None, optional
        Largest number of tiles run at once, by default all.
    pad_mode : {"replicate", "reflect"}, optional
        Padding of grids that are not tiled exactly, by default ``"replicate"``.
    """

    def __init__(
        self,
        n_input_frames: int,
        n_target_frames: int,
        in_channels: int,
        tile_size: int,
        tile_overlap: int = 0,
        tile_batch_size: int | None = None,
        pad_mode: str = "replicate",
    ) -> None:
        super().__init__()
        if not 0 <= tile_overlap < tile_size:
            raise ValueError(f"tile_overlap must be in [0, {tile_size}), got {tile_overlap}")
        if pad_mode not in PAD_MODES:
            raise ValueError(f"unknown pad mode {pad_mode!r}; expected one of {PAD_MODES}")
        self.n_input_frames = n_input_frames
        self.n_target_frames = n_target_frames
        self.in_channels = in_channels
        self.tile_size = tile_size
        self.tile_overlap = tile_overlap
        self.tile_batch_size = tile_batch_size
        self.pad_mode = pad_mode

    def forward_tiles(self, tiles: torch.Tensor) -> torch.Tensor:
        """Predict tiles: (n_tiles, T_in, C, tile, tile) -> (n_tiles, T_out, C, tile, tile)."""
        raise NotImplementedError

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """Predict future frames on a grid of any size.

        Parameters
        ----------
        frames : torch.Tensor
            Input of shape (batch, n_input_frames, in_channels, height, width).

        Returns
        -------
        torch.Tensor
            Prediction of shape (batch, n_target_frames, in_channels, height, width).
        """
        check_sequence_input(frames, self.n_input_frames, self.in_channels)
        return apply_tiled(
            self.forward_tiles,
            frames,
            self.tile_size,
            tile_overlap=self.tile_overlap,
            tile_batch_size=self.tile_batch_size,
            pad_mode=self.pad_mode,
        )
