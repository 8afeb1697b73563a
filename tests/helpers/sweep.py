"""One family of the architecture sweep, end to end, and the table of all of them.

`check_family(model_type)` builds the family's tiny causal LM (``models.tiny_causal_lm``)
and runs it through HCache as a user would: three chat rounds through
``hc.generate`` (same tokens as ``model.generate``), the restored cache against
the model's own prefill of the same prefix, the store closed and reopened (the
state now comes back from NVMe), and another model of the same family (other
weights) on the same store, which must restore nothing.  It returns a `Row`;
`problems` lists what went wrong (empty: served exactly).  Runs in worker
processes (``run_sweep``), so a family that crashes takes only its own process.

    python -m tests.helpers.sweep [--write docs/architectures.md] [--fp16 results.json] [--jobs 2] [TYPES...]
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

ATOL = 1e-5
CHUNK = 8
ROUNDS = 3
FIRST_PROMPT, NEW_TOKENS, GENERATED = 12, 9, 5
NOT_BUILDABLE = "not buildable"
FAMILIES_PER_WORKER = 12


@dataclass
class Row:
    family: str
    served_by: str = ""  # hidden | kv | recompute | refused | not buildable
    model_class: str = ""
    layers: str = ""  # cache kinds of the decoder layers, e.g. "full x2, sliding(12) x2"
    fast_path: bool = False
    max_error: float | None = None  # restored state vs the model's prefill, float32
    restored_tokens: list[int] = field(default_factory=list)
    reason: str = ""
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _layer_summary(layers) -> str:
    parts: list[tuple[str, int]] = []
    for ls in layers:
        name = f"{ls.kind}({ls.window})" if ls.window else ls.kind
        if parts and parts[-1][0] == name:
            parts[-1] = (name, parts[-1][1] + 1)
        else:
            parts.append((name, 1))
    return ", ".join(n if c == 1 else f"{n} x{c}" for n, c in parts)


def _generate_kwargs(model) -> dict:
    """Greedy; pad / bos / eos never generated, so every round grows by the same tokens and no model sees
    a pad token mid-text (some families position pad tokens differently in a prefill and in a decode step)."""
    cfg = model.generation_config
    special = {t for t in (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) if isinstance(t, int)}
    special -= {getattr(cfg, "forced_eos_token_id", None), getattr(cfg, "forced_bos_token_id", None)}
    return dict(max_new_tokens=GENERATED, do_sample=False, suppress_tokens=sorted(special) or None)


def _unpadded(out: torch.Tensor, model) -> torch.Tensor:
    """The output without pad tokens a forced end token put there: generate() would mask them in the next
    prompt, and HCache does not restore prompts with masked positions (their state depends on the mask)."""
    cfg = model.generation_config
    pad = cfg.pad_token_id
    if not isinstance(pad, int) or pad == cfg.eos_token_id:
        return out
    return out[:, out[0] != pad]


def _prompt(n: int, seed: int, vocab: int) -> torch.Tensor:
    return torch.randint(3, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def restore_error(model, cache, ids: torch.Tensor, n: int) -> float:
    """Largest difference between a restored cache and the model's own prefill of the first n tokens.

    The prefill is the one generate() runs (one step of it fills the cache with exactly the n tokens): some
    families' plain forward differs from it in the last bits (positions passed or not, sinusoid tables).
    """
    from hcache_adapter.compat import cache_kwarg, new_cache
    from hcache_adapter.projection.capture import state_difference

    ref = new_cache(model)
    pad = model.generation_config.pad_token_id
    model.generate(ids[:, :n], max_new_tokens=1, do_sample=False, pad_token_id=pad if pad is not None else 0,
                   **{cache_kwarg(model): ref})
    if len(cache.layers) != len(ref.layers):
        return float("inf")
    return max((state_difference(a, b)[0] for a, b in zip(cache.layers, ref.layers)), default=0.0)


def _open_store(root: Path):
    from hstore import StoreConfig, TieredStore

    return TieredStore(StoreConfig(root=root, dram_bytes=1 << 20, nvme_bytes=32 << 20, io_engine="threads"))


def check_family(model_type: str) -> Row:
    """The sweep for one family (module doc); never raises: what failed is in `Row.problems`.

    Quiet (no log records below ERROR, no warnings, one thread) for the call only: a test that runs it in
    its own process leaves the next tests' logging and threads as they were."""
    import logging

    disabled, threads = logging.root.manager.disable, torch.get_num_threads()
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore")
            return _check_family(model_type)
    finally:
        logging.disable(disabled)
        torch.set_num_threads(threads)


def _check_family(model_type: str) -> Row:
    from tests.helpers.models import NotBuildable, tiny_causal_lm

    row = Row(model_type)
    t0 = time.perf_counter()
    try:
        model = tiny_causal_lm(model_type)
    except NotBuildable as e:
        row.served_by, row.reason = NOT_BUILDABLE, str(e)
        return row
    row.model_class = type(model).__name__
    try:
        with tempfile.TemporaryDirectory() as tmp:
            _serve(model, model_type, row, Path(tmp) / "store")
    except Exception as e:  # a failure to report, not to hide
        row.problems.append(f"{type(e).__name__}: {str(e)[:300]}")
    row.seconds = round(time.perf_counter() - t0, 2)
    return row


def _serve(model, model_type: str, row: Row, root: Path) -> None:
    from hcache_adapter import HCache
    from hcache_adapter.projection import support
    from tests.helpers.models import tiny_causal_lm

    gen = _generate_kwargs(model)
    vocab = int(model.config.get_text_config(decoder=True).vocab_size)
    with _open_store(root) as store:
        try:
            hc = HCache(model, store, method="hcache", chunk_tokens=CHUNK)
        except ValueError:
            s = support(model)
            row.served_by, row.reason = s.kind, s.reason
            if s.kind != "refused":
                row.problems.append(f"HCache refused a model support() serves as {s.kind!r}")
            return
        s = hc.support  # what HCache serves it with (its saver may narrow what support() alone allows)
        row.served_by, row.reason, row.fast_path = s.kind, s.reason, s.fast_path
        row.layers = _layer_summary(s.layers)
        expected = {"hidden": "hcache", "kv": "kv", "recompute": "recompute"}[s.kind]
        if hc.method != expected:
            row.problems.append(f"HCache chose method {hc.method!r} for support {s.kind!r}")
        ids = _prompt(FIRST_PROMPT, 0, vocab)
        for rnd in range(ROUNDS):
            out = hc.generate(ids, **gen)
            if not torch.equal(out, model.generate(ids, **gen)):
                row.problems.append(f"round {rnd}: tokens differ from model.generate")
            row.restored_tokens.append(hc.last_restore.tokens)
            ids = torch.cat([_unpadded(out, model), _prompt(NEW_TOKENS, rnd + 1, vocab)], dim=1)
        if s.kind == "recompute":
            return  # nothing is stored: generate() is the model's own
        if not all(row.restored_tokens[1:]):
            row.problems.append(f"rounds after the first restored nothing: {row.restored_tokens}")
        cache, n = hc.restore(ids)
        row.max_error = restore_error(model, cache, ids, n)
        _check_saved_ahead(model, store, ids, gen, row)
        store.flush()
    with _open_store(root) as store:  # reopened: the state comes back from NVMe
        hc = HCache(model, store, method="hcache", chunk_tokens=CHUNK)
        cache, n2 = hc.restore(ids)
        if n2 != n or not hc.last_restore.sources.get("nvme"):
            row.problems.append(f"after reopening: restored {n2} tokens (before {n}), from {hc.last_restore.sources}")
        elif n2:
            row.max_error = max(row.max_error, restore_error(model, cache, ids, n2))
        other = tiny_causal_lm(model_type, seed=1)
        foreign = HCache(other, store, method="hcache", chunk_tokens=CHUNK)
        _, n3 = foreign.restore(ids)
        if n3:
            row.problems.append(f"another model of the family restored {n3} tokens of this one's state")
        if not torch.equal(foreign.generate(ids, **gen), other.generate(ids, **gen)):
            row.problems.append("another model's generate() on this store differs from its own")
    if row.max_error is None or not row.max_error <= ATOL:
        row.problems.append(f"restored state differs from the prefill by {row.max_error}")


def _check_saved_ahead(model, store, ids: torch.Tensor, gen: dict, row: Row) -> None:
    """`hc.save` (a document stored ahead of time, outside generate()) stores what generate() would have built:
    restored, it equals generate()'s prefill, and generate() from it gives model.generate's tokens."""
    from hcache_adapter import HCache

    ahead = HCache(model, store, method="hcache", chunk_tokens=CHUNK, namespace="saved-ahead")
    ahead.save(ids)
    cache, n = ahead.restore(ids)
    if not n:
        row.problems.append("hc.save stored nothing")
        return
    row.max_error = max(row.max_error, restore_error(model, cache, ids, n))
    if not torch.equal(ahead.generate(ids, **gen), model.generate(ids, **gen)):
        row.problems.append("after hc.save: tokens differ from model.generate")


def run_sweep(model_types: list[str], jobs: int = 2) -> list[Row]:
    """`check_family` for each type, `jobs` processes at a time; a crashed worker is reported, not fatal."""
    rows: dict[str, Row] = {}
    pending = list(model_types)
    ctx = multiprocessing.get_context("spawn")
    while pending:
        batch = pending[: jobs * FAMILIES_PER_WORKER]  # fresh workers now and then: imported modeling code adds up
        with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
            futures = {pool.submit(check_family, t): t for t in batch}
            try:
                for fut in cf.as_completed(futures):
                    rows[futures[fut]] = fut.result()
            except cf.process.BrokenProcessPool:
                pass
        left = [t for t in batch if t not in rows]
        if left == batch:  # the first of them takes the pool down every time
            rows[left[0]] = Row(left[0], problems=["its worker process died"])
        pending = [t for t in pending if t not in rows]
    return [rows[t] for t in model_types]


# ------------------------------------------------------------------------- the table
def table(rows: list[Row], fp16: dict[str, float] | None = None) -> str:
    fp16 = fp16 or {}
    lines = ["| family | model class | served by | decoder layers | fast path | max abs error (fp32) | "
             "max abs error (fp16, GPU) | why not hidden-state restore |", "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r.family):
        err = "" if r.max_error is None else f"{r.max_error:.1e}"
        half = f"{fp16[r.family]:.1e}" if isinstance(fp16.get(r.family), (int, float)) else ""
        served = r.served_by + (" (FAILED)" if r.problems else "")
        why = (r.reason or "") + ("; " + "; ".join(r.problems) if r.problems else "")
        lines.append(f"| {r.family} | {r.model_class} | {served} | {r.layers} | {'yes' if r.fast_path else ''} | "
                     f"{err} | {half} | {why.replace('|', '/')} |")
    return "\n".join(lines)


def counts(rows: list[Row]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in rows:
        key = "failed" if r.problems else r.served_by
        out[key] = out.get(key, 0) + 1
    return out


def document(rows: list[Row], fp16: dict[str, float] | None, seconds: float, jobs: int) -> str:
    import transformers

    from hcache_adapter.projection import supported_model_types

    fast_types = supported_model_types()
    c = counts(rows)
    built = len(rows) - c.get(NOT_BUILDABLE, 0)
    hidden = c.get("hidden", 0)
    fp16_note = ("The fp16 column: `benchmarks/fp16_errors.py --families all` on the lent H200 (transformers 5.17 there: "
                 f"{len(fp16)} families; a blank is a family that version lacks or does not serve from hidden states; "
                 "`benchmarks/results/h200/fp16_errors.md`)." if fp16 else
                 "The fp16 column is `benchmarks/fp16_errors.py --families all` on a GPU (pass its --json as --fp16).")
    return f"""# Architectures: how HCache serves every causal-LM family of transformers

Generated by `python -m tests.helpers.sweep --write docs/architectures.md` (the `sweep` test runs the same
checks): transformers {transformers.__version__}, torch {torch.__version__}, every model type of
`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`, each as a tiny random model (4 layers, width 64, float32, CPU), three chat
rounds through `HCache.generate` compared token for token with `model.generate`, the state stored by `hc.save`
checked too, the restored cache compared with the model's own prefill, the store reopened, and another model's state kept apart.

- **hidden**: every layer's cache is rebuilt from its stored input hidden state (hidden-state restore); with a
  fast path, by a hand-written projection (checked against the model's cache), else by the generic one.
- **kv**: not rebuildable from hidden states; the cache is plain K/V, saved and reloaded as it is.
- **recompute**: nothing is stored; `generate()` is the model's own (the reason says why).
- **refused**: `HCache(...)` raises up front with the reason.
- **not buildable**: no tiny text-only model could be built (the reason says why); not counted below.

Buildable families: {built}; served by hidden-state restore: {hidden} ({100 * hidden / max(built, 1):.0f}%);
kv: {c.get('kv', 0)}; recompute: {c.get('recompute', 0)}; refused: {c.get('refused', 0)};
failed: {c.get('failed', 0)}.  Sweep time: {seconds:.0f} s with {jobs} processes.
{fp16_note}

{table(rows, fp16)}

## Fast paths, and how to add one

Hand-written projections exist for {", ".join(f"`{t}`" for t in fast_types)} (`hcache_adapter/projection/`,
one module per family). `support()` uses one only where it reproduces the model's own cache on the probe; every
other family goes through the generic projection, which runs the model's decoder layer itself up to its cache
write (a one-head query where the layer allows it). A fast path pays where the generic one computes more than
K and V: a fused QKV projection the generic path cannot cut, or a per-layer CPU cost that matters on a GPU
(the Llama family's is compiled and replayed as CUDA graphs); `benchmarks/projection_speed.py` measures both.

To add one: a module in `hcache_adapter/projection/` with a `Projector` subclass decorated
`@register("<model_type>")`, imported in `projection/__init__.py`, and a tiny case in `tests/helpers/models.py`'s
`CASES`: `tests/hcache/test_projection_generic.py` then checks it bit for bit against the generic projection in
float32, and `tests/hcache/test_projection.py` against the model's cache and for the GEMMs it runs.
"""


def main() -> int:
    from tests.helpers.models import causal_lm_types

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("types", nargs="*", help="model types (default: every causal-LM type)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--write", type=Path, help="write the markdown document here")
    p.add_argument("--fp16", type=Path, help="JSON {family: fp16 max abs error} from benchmarks/fp16_errors.py")
    p.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = p.parse_args()
    t0 = time.perf_counter()
    rows = run_sweep(args.types or causal_lm_types(), args.jobs)
    seconds = time.perf_counter() - t0
    fp16 = json.loads(args.fp16.read_text()) if args.fp16 else None
    print(table(rows, fp16))
    print(counts(rows), f"{seconds:.0f} s")
    if args.write:
        args.write.write_text(document(rows, fp16, seconds, args.jobs))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
