"""``make demo``: the pipeline end to end on the BoM sample (synthetic fallback offline)."""

from __future__ import annotations

import os
import sys

from nowcast.cli import describe_cube
from nowcast.config import load_catalog
from nowcast.data import DataUnavailableError, fetch_sample_data
from nowcast.ingest import ingest
from nowcast.io.cube import open_cube


def real_data_available(source: str) -> bool:
    try:
        fetch_sample_data([source], progress=False)
    except (DataUnavailableError, Exception) as err:  # noqa: BLE001 - any failure means fallback
        print(f"real data for '{source}' unavailable ({err}); falling back to the synthetic source")
        return False
    return True


def main() -> int:
    catalog = load_catalog()
    source = "bom" if os.environ.get("NOWCAST_DATA_ROOT") and real_data_available("bom") else None
    source = source or "synthetic"
    print(f"== ingest {source}")
    result = ingest(source, "data/cubes", catalog=catalog)
    print(result.summary())
    print(describe_cube(open_cube(result.path)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
