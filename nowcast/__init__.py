"""nowcast: precipitation nowcasting research pipeline.

Radar composites -> CF zarr cube -> normalized patch store -> ConvLSTM -> verification against
pysteps baselines -> maps and CF NetCDF.
"""

import importlib
import sys
from contextlib import redirect_stdout
from io import StringIO
from types import ModuleType

__version__ = "0.1.0"


def import_pysteps(name: str = "pysteps") -> ModuleType:
    """Import pysteps, or one of its modules, without pysteps' configuration banner.

    pysteps prints "Pysteps configuration file found at: ..." when it is first imported in a
    process (each Dask worker included) unless the user's pystepsrc sets ``silent_import``.
    Every pysteps import in this package goes through this function, so whichever module
    imports pysteps first does so with stdout captured. pysteps' settings are left untouched,
    and nothing is imported until a module that uses pysteps is (``nowcast --help`` stays fast).

    Parameters
    ----------
    name : str, optional
        Module to import, by default ``"pysteps"``; for example ``"pysteps.motion"``.

    Returns
    -------
    types.ModuleType
        The imported module.
    """
    if "pysteps" not in sys.modules:
        with redirect_stdout(StringIO()):
            importlib.import_module("pysteps")
    return importlib.import_module(name)
