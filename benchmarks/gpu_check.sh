#!/usr/bin/env bash
# One-shot GPU check on a lent NVIDIA machine (the device tool's `run`), from the repo root:
#
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=600)
#
# .whl/ (ignored through .git/info/exclude) holds the cp312 wheels of the packages that the
# machine's image lacks (pydantic, zarr, dask/distributed, pyproj, pysteps, ...; see the list in
# benchmarks/bench_gpu.py's report) and .whl/optional/typing_extensions, installed only when the
# image's is older than pydantic needs. There is no network there, so no `pip install -e .`:
# PYTHONPATH=$PWD makes `import nowcast` work and the CLI runs as `python3 -m nowcast.cli`.
# Everything lands in $OUT: env.txt, pytest.log, pytest.xml, bench_gpu.log, bench_gpu.json.
# Expected wall time about 5 minutes (pytest ~1, benchmark ~3-4 with torch.compile).
set -u
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg NOWCAST_DATA_ROOT=/tmp/nowcast-no-radar-data
# Offline machines: install the carried wheels. Elsewhere `pip install -e .` the project first
# (after torch with CUDA) and run this script without a .whl folder.
if [ -d .whl ]; then
  PIP="python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade"
  $PIP --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
  python3 -c 'import importlib.metadata as m, sys
sys.exit(tuple(map(int, m.version("typing_extensions").split(".")[:2])) < (4, 16))' ||
    $PIP --target /tmp/site .whl/optional/*.whl
fi

{
  nvidia-smi -L
  python3 -c 'import sys, torch; print(sys.version); print("torch", torch.__version__,
    torch.version.cuda, torch.cuda.get_device_name(0), torch.cuda.is_bf16_supported())'
  python3 -m pip list 2>/dev/null | grep -iE '^(numpy|xarray|pandas|typing.extensions|pydantic|zarr|dask|pysteps|pyproj|typer) '
  python3 -c 'import nowcast.train, nowcast.ingest, nowcast.patches, nowcast.dataset
import nowcast.lagrangian, nowcast.evaluate, nowcast.cli; print("nowcast imports: ok")'
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

set -o pipefail
timeout 100 python3 -m pytest -x -q -p no:cacheprovider --junitxml="$OUT/pytest.xml" \
  tests/test_models.py tests/test_train.py tests/test_dataset.py tests/test_lagrangian.py \
  2>&1 | tee "$OUT/pytest.log"
echo "pytest exit status: $?"

timeout 360 python3 -m benchmarks.bench_gpu --out "$OUT/bench_gpu.json" 2>&1 |
  tee "$OUT/bench_gpu.log"
echo "bench_gpu exit status: $?"
