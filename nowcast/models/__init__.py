"""Nowcasting models: the ConvLSTM encoder-forecaster and comparison models.

Every model follows one contract: the constructor takes
``(n_input_frames, n_target_frames, in_channels=1, **arch_kwargs)`` and ``forward`` maps a tensor
of shape (batch, n_input_frames, channels, height, width) to one of shape
(batch, n_target_frames, channels, height, width) with unconstrained real values (training
happens in normalised space). Look models up by name with :func:`get_method` or build them with
:func:`build_model`; add your own with the :func:`register` decorator.

=================== =================================================================
name                model
=================== =================================================================
convlstm            :class:`EncoderForecaster` (default; Shi et al., 2015)
cnn_lstm            :class:`CNNLSTM` (serial CNN-LSTM, tiled)
fc_lstm             :class:`FCLSTM` (fully connected LSTM of Shi et al., 2015, tiled)
stochastic_convlstm :class:`StochasticEncoderForecaster`: the residual ConvLSTM driven by
                    correlated noise, an ensemble (its ``stochastic`` attribute is True:
                    ``forward(frames, n_members)`` adds a member axis after the batch)
=================== =================================================================
"""

from nowcast.models.cnn_lstm import CNNLSTM
from nowcast.models.complexity import count_parameters, forward_flops
from nowcast.models.convlstm import ConvLSTMCell, EncoderForecaster
from nowcast.models.fc_lstm import FCLSTM
from nowcast.models.registry import (
    DEFAULT_MODEL,
    build_model,
    get_method,
    register,
    registered_models,
)
from nowcast.models.stochastic import StochasticEncoderForecaster

__all__ = [
    "CNNLSTM",
    "DEFAULT_MODEL",
    "FCLSTM",
    "ConvLSTMCell",
    "EncoderForecaster",
    "StochasticEncoderForecaster",
    "build_model",
    "count_parameters",
    "forward_flops",
    "get_method",
    "register",
    "registered_models",
]
