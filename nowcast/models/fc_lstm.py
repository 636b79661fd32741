"""Fully connected LSTM (FC-LSTM) baseline of Shi et al. (2015) on flattened tiles."""

from __future__ import annotations

import torch
from torch import nn

from nowcast.models.registry import register
from nowcast.models.spatial import TiledSequenceModel


@register("fc_lstm")
class FCLSTM(TiledSequenceModel):
    """FC-LSTM encoder-forecaster on flattened tiles (the baseline of Shi et al., 2015).

    Every frame of a tile is flattened into a vector of ``in_channels * tile_size ** 2`` values;
    an encoder LSTM reads the vectors, a forecaster LSTM with its own weights starts from the
    encoder's final state and unrolls ``n_target_frames`` steps without input, and a linear
    layer maps each forecaster output back to a flattened tile. Larger grids are predicted tile
    by tile (see :class:`~nowcast.models.spatial.TiledSequenceModel`).

    Parameters
    ----------
    n_input_frames : int
        Number of past frames read.
    n_target_frames : int
        Number of future frames predicted.
    in_channels : int, optional
        Channels per frame, by default 1.
    tile_size : int, optional
        Side of the tile the network reads, by default 16.
    hidden_size : int, optional
        Hidden size of the LSTMs, by default 512.
    num_layers : int, optional
        Number of stacked LSTM layers, by default 2.
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
        in_channels: int = 1,
        tile_size: int = 16,
        hidden_size: int = 512,
        num_layers: int = 2,
        tile_overlap: int = 0,
        tile_batch_size: int | None = None,
        pad_mode: str = "replicate",
    ) -> None:
        super().__init__(
            n_input_frames,
            n_target_frames,
            in_channels,
            tile_size,
            tile_overlap=tile_overlap,
            tile_batch_size=tile_batch_size,
            pad_mode=pad_mode,
        )
        n_values = in_channels * tile_size**2
        self.encoder_lstm = nn.LSTM(n_values, hidden_size, num_layers, batch_first=True)
        # An input size of 1 fed with zeros: the forecaster is driven by its state alone.
        self.forecaster_lstm = nn.LSTM(1, hidden_size, num_layers, batch_first=True)
        self.readout = nn.Linear(hidden_size, n_values)

    def forward_tiles(self, tiles: torch.Tensor) -> torch.Tensor:
        """Predict tiles: (n_tiles, T_in, C, tile, tile) -> (n_tiles, T_out, C, tile, tile).

        Parameters
        ----------
        tiles : torch.Tensor
            Input tiles of side ``tile_size``.

        Returns
        -------
        torch.Tensor
            Predicted tiles.
        """
        n_tiles, n_frames = tiles.shape[:2]
        _, state = self.encoder_lstm(tiles.reshape(n_tiles, n_frames, -1))
        no_input = tiles.new_zeros(n_tiles, self.n_target_frames, 1)
        outputs, _ = self.forecaster_lstm(no_input, state)
        predicted = self.readout(outputs)
        return predicted.reshape(n_tiles, self.n_target_frames, *tiles.shape[2:])
