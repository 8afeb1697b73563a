"""Serving many sessions: batched restores, GPU-resident hot contexts, and the trace experiment.

    rows.py        where each row of a left-padded batch starts (pure arithmetic)
    batch.py       BatchedGenerator: a prefix per row, then one batched generate()
    resident.py    ResidentContexts: recent contexts' K/V on the GPU under a budget (hstore's policies)
    stats.py       ServingStats: GPU hits, restores, computed tokens (`hc.stats`)
    trace.py       synthetic ShareGPT-like chat and L-Eval-like document traces
    simulate.py    the replay: Poisson arrivals, an FCFS batching server, per-request timings
    serve_bench.py `hcache serve-bench`
    report.py      CSV, markdown and PNG of a serve-bench run

Nothing is imported here: `generation` uses `rows`, and `batch` uses `generation`.
"""
