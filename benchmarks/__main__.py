"""``make bench``: run every benchmark module (or those named on the command line), then print
one table of every ratio (:mod:`benchmarks.summary`)."""

from __future__ import annotations

import importlib
import pkgutil
import sys
import traceback
from pathlib import Path

from benchmarks.summary import ratio_table


def main(argv: list[str]) -> int:
    names = argv or sorted(
        m.name[len("bench_") :]
        for m in pkgutil.iter_modules([str(Path(__file__).parent)])
        if m.name.startswith("bench_")
    )
    failed = []
    for name in names:
        print(f"\n=== {name}")
        try:
            importlib.import_module(f"benchmarks.bench_{name}").main()
        except Exception:  # one failing benchmark should not hide the others' numbers
            traceback.print_exc()
            failed.append(name)
    print("\n=== ratios (each against its peer in the same run)")
    print(ratio_table(set(names) - set(failed)))
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
