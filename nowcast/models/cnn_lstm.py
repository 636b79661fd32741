"""Serial CNN-LSTM baseline: per-frame CNN encoder, LSTM over time, transposed-conv decoder."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from nowcast.models.registry import register
from nowcast.models.spatial import TiledSequenceModel


@register("cnn_lstm")
class CNNLSTM(TiledSequenceModel):
    """Serial CNN-LSTM nowcaster (convolutional features, fully connected recurrence).

    Each input frame of a tile goes through a CNN (3x3 conv, ReLU, 2x2 max-pool per level); its
    feature map is flattened and an encoder LSTM reads the sequence of feature vectors. A
    forecaster LSTM with its own weights starts from the encoder's final state and unrolls
    ``n_target_frames`` steps without input (as the ConvLSTM forecaster); each of its outputs is
    mapped back to a feature map by a linear layer and decoded to a frame by transposed
    convolutions. Unlike the ConvLSTM, the recurrence sees no spatial structure.

    Flattening fixes the tile the network reads (``tile_size``); larger grids are predicted tile
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
        Side of the tile the network reads; must be divisible by ``2 ** len(conv_channels)``.
        By default 64.
    conv_channels : sequence of int, optional
        Channels of each CNN level, by default (16, 32, 64).
    lstm_hidden : int, optional
        Hidden size of the LSTMs, by default 256.
    lstm_layers : int, optional
        Number of stacked LSTM layers, by default 1.
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
        tile_size: int = 64,
        conv_channels: Sequence[int] = (16, 32, 64),
        lstm_hidden: int = 256,
        lstm_layers: int = 1,
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
        conv_channels = tuple(conv_channels)
        if not conv_channels:
            raise ValueError("conv_channels must have at least one level")
        reduction = 2 ** len(conv_channels)
        if tile_size % reduction:
            raise ValueError(f"tile_size {tile_size} is not divisible by {reduction}")
        self.feature_shape = (conv_channels[-1], tile_size // reduction, tile_size // reduction)
        n_features = conv_channels[-1] * (tile_size // reduction) ** 2

        encoder_layers: list[nn.Module] = []
        channels = in_channels
        for out_channels in conv_channels:
            encoder_layers += [
                nn.Conv2d(channels, out_channels, 3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            channels = out_channels
        self.frame_encoder = nn.Sequential(*encoder_layers)
        self.encoder_lstm = nn.LSTM(n_features, lstm_hidden, lstm_layers, batch_first=True)
        # An input size of 1 fed with zeros: the forecaster is driven by its state alone.
        self.forecaster_lstm = nn.LSTM(1, lstm_hidden, lstm_layers, batch_first=True)
        self.to_features = nn.Sequential(nn.Linear(lstm_hidden, n_features), nn.ReLU())

        decoder_layers: list[nn.Module] = []
        decoder_channels = (*conv_channels[::-1], conv_channels[0])
        for level in range(len(conv_channels)):
            decoder_layers += [
                nn.ConvTranspose2d(decoder_channels[level], decoder_channels[level + 1], 4, 2, 1),
                nn.ReLU(),
            ]
        decoder_layers.append(nn.Conv2d(conv_channels[0], in_channels, 3, padding=1))
        self.frame_decoder = nn.Sequential(*decoder_layers)

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
        features = self.frame_encoder(tiles.reshape(n_tiles * n_frames, *tiles.shape[2:]))
        _, state = self.encoder_lstm(features.reshape(n_tiles, n_frames, -1))
        no_input = tiles.new_zeros(n_tiles, self.n_target_frames, 1)
        outputs, _ = self.forecaster_lstm(no_input, state)
        feature_maps = self.to_features(outputs).reshape(
            n_tiles * self.n_target_frames, *self.feature_shape
        )
        frames = self.frame_decoder(feature_maps)
        return frames.reshape(n_tiles, self.n_target_frames, *frames.shape[1:])
