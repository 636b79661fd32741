"""nowcast: precipitation nowcasting research pipeline.

Radar composites -> CF zarr cube -> normalized patch store -> ConvLSTM -> verification against
pysteps baselines -> maps and CF NetCDF.
"""

# Private aliases: a name like ``io`` here would clash with the subpackage ``nowcast.io``.
import importlib.abc as _abc
import importlib.util as _util
import sys as _sys
from contextlib import redirect_stdout as _redirect_stdout
from io import StringIO as _StringIO

__version__ = "0.1.0"


class _QuietPystepsImport(_abc.MetaPathFinder, _abc.Loader):
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
        _sys.meta_path.remove(self)
        spec = _util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        self._loader = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        with _redirect_stdout(_StringIO()):
            self._loader.exec_module(module)


if "pysteps" not in _sys.modules and not any(
    isinstance(finder, _QuietPystepsImport) for finder in _sys.meta_path
):
    _sys.meta_path.insert(0, _QuietPystepsImport())
