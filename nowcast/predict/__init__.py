"""predict: operational nowcasts from the newest radar frames.

:func:`predict` (``nowcast predict``) issues one nowcast from the newest (or a chosen) frames;
``nowcast predict --watch`` (:mod:`nowcast.predict.watch`) keeps the model loaded and issues one
for every new frame. Both write the same set of files (:mod:`nowcast.predict.outputs`).
"""

from nowcast.predict.issue import (
    InputFramesError,
    Predictor,
    PredictResult,
    cube_from_files,
    cube_reference_time,
    inputs_from_files,
    predict,
)

__all__ = [
    "InputFramesError",
    "PredictResult",
    "Predictor",
    "cube_from_files",
    "cube_reference_time",
    "inputs_from_files",
    "predict",
]
