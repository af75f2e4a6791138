"""``make bench``: every figure of the suite in one run, written to ``bench/results.md``.

Not part of ``make test``: it takes 15–30 minutes on 2 cores and its figures mean something
only on a quiet machine. ``--quick`` shortens every figure (a smoke run of the suite itself).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from bench import end_to_end, phases, queue_scale, submit, throughput
from bench.common import write_results


def main() -> None:
    """Run figures 1–6 and write the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs: checks the suite, not the figures")
    args = parser.parse_args()
    quick = args.quick
    tables = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tables += end_to_end.bench(3 if quick else 20, 3 if quick else 20, root / "e2e")
        tables += [phases.bench(3 if quick else 20, 1 if quick else 2, root / "phases")]
        tables += [submit.bench(300 if quick else 3000, 16, 1, root / "submit")]
        tables += throughput.bench(100 if quick else 2000, root / "throughput")
        tables += [queue_scale.bench(1000 if quick else 100_000, 50 if quick else 200, root / "scale")]
    write_results(tables)


if __name__ == "__main__":
    main()
