"""predict: operational nowcasts from the newest radar frames.

:func:`predict` (``nowcast predict``) issues one nowcast from the newest (or a chosen) frames;
``nowcast predict --watch`` (:mod:`nowcast.predict.watch`) keeps the model loaded and issues one
for every new frame. Both write the same set of files (:mod:`nowcast.predict.outputs`).
"""

from nowcast.predict.frames import (
    InputFramesError,
    cube_from_files,
    cube_reference_time,
    inputs_from_files,
)
from nowcast.predict.issue import Predictor, PredictResult, predict

__all__ = [
    "InputFramesError",
    "PredictResult",
    "Predictor",
    "cube_from_files",
    "cube_reference_time",
    "inputs_from_files",
    "predict",
]
