"""nowcast: precipitation nowcasting research pipeline.

Radar composites -> CF zarr cube -> normalized patch store -> ConvLSTM -> verification against
pysteps baselines -> maps and CF NetCDF.
"""

import contextlib
import importlib.abc
import importlib.util
import io
import sys

__version__ = "0.1.0"


class _QuietPystepsImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Import pysteps without its banner ("Pysteps configuration file found at: ...").

    pysteps prints the banner on import unless the user's pystepsrc sets ``silent_import``; it
    came once per process and once per Dask worker. The first ``import pysteps`` (wherever it
    happens, workers included: they import this package to run its tasks) goes through this
    finder, which runs the module with stdout captured and then removes itself. Installed here
    rather than importing pysteps eagerly, which would cost `nowcast --help` seconds.
    """

    def find_spec(self, name, path=None, target=None):
        if name != "pysteps":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        self._loader = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        with contextlib.redirect_stdout(io.StringIO()):
            self._loader.exec_module(module)


if "pysteps" not in sys.modules and not any(
    isinstance(finder, _QuietPystepsImport) for finder in sys.meta_path
):
    sys.meta_path.insert(0, _QuietPystepsImport())
