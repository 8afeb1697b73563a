"""`hstore bench`, kept out of the library: what each tier delivers through the store's public API,
next to what the hardware gives (raw O_DIRECT reads, pinned host-to-device copies).

    hstore bench ROOT [--sizes 256K,1M] [--total 512M] [--tiers dram,nvme,gpu] ...

`run_bench(BenchConfig(...))` returns a `BenchReport`; `format_report` and `write_csv` render it.
It uses nothing of hstore but its public API (a timing I/O engine is passed in the config).
"""
from __future__ import annotations

from hstore_bench.results import (
    CSV_COLUMNS,
    TIERS,
    BenchConfig,
    BenchReport,
    BenchRow,
    Target,
    evaluate_targets,
    format_report,
    write_csv,
)
from hstore_bench.runner import BenchError, plan, run_bench

__all__ = ["BenchConfig", "BenchReport", "BenchRow", "Target", "BenchError", "CSV_COLUMNS", "TIERS", "plan",
           "run_bench", "evaluate_targets", "format_report", "write_csv"]
