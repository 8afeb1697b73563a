"""HCache: wrap a HuggingFace causal LM once; later requests sharing a prefix restore it.

    hc = HCache(model, store, method="hcache")   # "hcache" | "kv" | "recompute" | "auto"
    out = hc.generate(input_ids, max_new_tokens=32)
    result = hc.restore(input_ids)               # .cache, .tokens (unpacks as `cache, n`)

`generate` restores the longest stored prefix (whole 64-token chunks) under
the model's own `generate`, which runs its prefill of the new tokens while the
prefix's layers are still being made ready, saves every new whole chunk as it
goes, and returns exactly what `model.generate` returns. The tail shorter than
a chunk is not stored: it is recomputed with the new tokens of the next
request, which costs at most 63 tokens of prefill and keeps every stored chunk
immutable.

This class is the front only; the parts are `StateLayout` (what a chunk is),
`StateSaver` (saving), `Restorer` (loading, projecting, recomputing),
`AutoScheduler` (auto's decisions), `AutoSplits` (its restore-time splits and
what it learns from them) and `generation` (what a call asks for).
A model loaded with transformers' tensor parallelism is detected and served
rank by rank (hcache_adapter.parallel: every rank runs the same calls).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch

from hcache_adapter.capture import StateSaver
from hcache_adapter.compat import cache_kwarg, generate_positions, new_cache
from hcache_adapter.firstforward import after_first_forward, first_forward, skip_cached_tokens
from hcache_adapter.generation import cache_for_call, inspect_call, with_cache
from hcache_adapter.layout import StateLayout
from hcache_adapter.manifest import HIDDEN, KV, RECOMPUTE
from hcache_adapter.parallel import tp as tensor_parallel
from hcache_adapter.parallel.gather import HiddenExchange
from hcache_adapter.parallel.projection import shard_projector
from hcache_adapter.prefill_graph import CapturedPrefill
from hcache_adapter.prefix import ManifestCache, complete_chunks, locate_layers, stored_prefix
from hcache_adapter.projection import support as model_support
from hcache_adapter.projection.continuation import STEP, generate_on, step_through
from hcache_adapter.recompute import Recomputer
from hcache_adapter.restore import Restorer, RestoreResult
from hcache_adapter.scheduler.auto import AutoScheduler, SplitDecision
from hcache_adapter.scheduler.decisions import AutoSplits
from hcache_adapter.scheduler.planner import min_recompute
from hcache_adapter.scheduler.profile import Profile
from hcache_adapter.serving.batch import BatchedGenerator
from hcache_adapter.serving.resident import GPU_SOURCE, admit_generated, make_resident
from hcache_adapter.serving.stats import ServingStats

log = logging.getLogger(__name__)

METHODS = ("hcache", "kv", "recompute", "auto")
RestoreInfo = RestoreResult  # the name before restore() returned its result


class HCache:
    """HCache save / project / restore for one model over one `hstore.TieredStore`.

    method: "hcache" saves every layer's input hidden state and projects it back
    to K/V; "kv" saves K/V (the offload baseline); "recompute" saves nothing and
    prefills from tokens; "auto" saves per layer what the profile says is
    cheapest to restore (or the explicit `plan`, one letter per layer: H, K or
    R) and, at restore time, recomputes as many leading layers as balances I/O
    against compute for the tier the state is actually in.

    On a GPU the projection runs `torch.compile`d (`compile=`) and, for restore
    lengths seen before, as replayed CUDA graphs (`cuda_graphs=`), and generate()'s
    first forward over a restored prefix is replayed from a CUDA graph
    (`captured_prefill=`); all default to on with CUDA and off elsewhere (on a
    CPU, `captured_prefill=True` runs the same static-shape forward eagerly).

    `gpu_context_bytes` keeps recent contexts' K/V on the GPU between requests
    (at most that many bytes, evicted by hstore's `gpu_context_policy`: "lru",
    "s3fifo" or "cost"); a request whose prefix is resident restores nothing.
    `stats` counts GPU hits, restores and computed tokens.

    `hold_flusher` (default on) holds the store's flusher back from the start of a
    generate()'s restore until its first forward returns (`TieredStore.hold_background`).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        store,
        method: str = "hcache",
        *,
        chunk_tokens: int = 64,
        namespace: str = "hc",
        model_id: str | None = None,
        profile: Profile | None = None,
        plan: str | None = None,
        prefetch_bytes: int | None = None,
        compile: bool | None = None,
        cuda_graphs: bool | None = None,
        captured_prefill: bool | None = None,
        gpu_context_bytes: int | None = None,
        gpu_context_policy: str = "lru",
        hold_flusher: bool = True,
    ):
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if not isinstance(chunk_tokens, int) or isinstance(chunk_tokens, bool) or chunk_tokens < 1:
            raise ValueError("chunk_tokens must be a positive int")
        if plan is not None and method != "auto":
            raise ValueError("an explicit plan goes with method='auto'")
        self.model = model
        self.store = store
        self.hold_flusher = hold_flusher and hasattr(store, "hold_background")
        on_gpu = next(model.parameters()).device.type == "cuda"
        self.tp = tensor_parallel.detect(model)  # None: the model is on one device
        # Up front: how this model can be served, and why (under TP the Llama shard projector serves it).
        self.support = None if self.tp else model_support(model)
        if self.support is not None and self.support.kind == "refused":
            raise ValueError(f"HCache cannot serve {type(model).__name__}: {self.support.reason}")
        self.projector = shard_projector(model) if self.tp else self.support.projector
        if self.projector is not None and hasattr(self.projector, "compile"):
            # One compiled graph for norm + K/V GEMMs + rotary: worth it on a GPU, not on a CPU.
            self.projector.compile = on_gpu if compile is None else compile
        if self.projector is not None and hasattr(self.projector, "graphs"):
            # Replayed CUDA graphs for repeated restore lengths: the CPU cost of a layer drops ~10x.
            self.projector.graphs = on_gpu if cuda_graphs is None else cuda_graphs
        if self.tp:
            self.decoder_layers = self.projector.decoder_layers if self.projector else _find_decoder_layers(model)
            can_kv = True
        else:
            self.decoder_layers = list(self.support.decoder_layers)
            if not self.decoder_layers and self.support.kind != "recompute":  # looped models keep none
                self.decoder_layers = _find_decoder_layers(model)
            can_kv = self.support.kind in ("hidden", "kv") and all(
                layer.plain_kv or layer.sliding_kv for layer in self.support.layers)  # the saver stops at a full window
        if (method in ("hcache", "auto") and self.projector is None) or (method == "kv" and not can_kv):
            fallback = "kv" if can_kv else "recompute"
            log.warning("HCache cannot serve model_type %r with method %r (%s); it falls back to %r",
                        getattr(model.config, "model_type", "?"), method,
                        self.support.reason if self.support else "no projection", fallback)
            method = fallback
        self.method = method
        self.layout = StateLayout.for_model(model, self.projector, namespace=namespace, chunk_tokens=chunk_tokens,
                                            model_id=model_id)
        if self.tp:
            self.layout = tensor_parallel.shard_layout(self.layout, self.tp, model, self.decoder_layers)
        self.recomputer = Recomputer(model, self.decoder_layers)
        self.manifests = ManifestCache()  # of the chunks found lately: lookups of state on NVMe read none again
        self.restorer = Restorer(self.layout, store, self.projector, self.recomputer, self.device,
                                 prefetch_bytes=prefetch_bytes,
                                 exchange=HiddenExchange(self.tp, self.layout, store, self.device) if self.tp else None)
        self._profile = profile
        self.scheduler = AutoScheduler(self.layout, lambda: self.profile, plan) if method == "auto" else None
        self._cache_kw = cache_kwarg(model)
        use_graph = (on_gpu if captured_prefill is None else captured_prefill) and not self.tp  # no collectives in graphs
        self.prefill = (CapturedPrefill(model, self.decoder_layers, self._cache_kw, self.recomputer.internal)
                        if use_graph and CapturedPrefill.supported(model) else None)
        # auto's restore-time splits, learning from what the NVMe ones took (read at its next decision)
        self.splits = (AutoSplits(self.scheduler, store, self.layout, self.device, ring_depth=self.restorer.ring_depth,
                                  one_time_costs=self._one_time_costs)
                       if self.scheduler is not None else None)
        self.last_restore = RestoreResult(cache=None)  # for benchmarks and the demo; nothing reads it back
        # Serving (hcache_adapter.serving): recent contexts' K/V kept on the GPU, a restore per row of a batch.
        stores = self.method != "recompute"
        self.stats = ServingStats()
        self.resident = make_resident(gpu_context_bytes, self.layout, model.config, policy=gpu_context_policy,
                                      stats=self.stats, profile=lambda: self.profile, plan=self.save_plan,
                                      stored=self._stored_chunks if stores else None)
        self.batched = BatchedGenerator(model, self.layout, resident=self.resident, stats=self.stats,
                                        restore_row=self._restore_row if stores else None,
                                        saver_for=self._row_saver if stores else None)

    # ------------------------------------------------------------------ properties
    @property
    def num_layers(self) -> int:
        return self.layout.num_layers

    @property
    def fingerprint(self) -> str:
        return self.layout.fingerprint

    @property
    def namespace(self) -> str:
        return self.layout.namespace

    @property
    def chunk_tokens(self) -> int:
        return self.layout.chunk_tokens

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def profile(self) -> Profile:
        """The hardware profile `auto` plans with: given, loaded from the store root, or measured once."""
        if self._profile is None:
            from hcache_adapter.scheduler.profiling import measure_profile

            degree = f"-tp{self.tp.world}" if self.tp else ""
            path = Path(self.store.config.root) / "profiles" / f"{self.fingerprint}-{self.device.type}{degree}.json"
            devices = [self.device] if self.device.type == "cuda" else []

            def measure() -> Profile:
                with torch.random.fork_rng(devices=devices):  # the probes draw random inputs: not from the user's RNG
                    return measure_profile(self.store, self.layout, self.projector, self.recomputer, self.device)

            if self.tp:  # collective: every rank plans with one profile
                from hcache_adapter.parallel.profile import tensor_parallel_profile

                hidden = self.projector.hidden_size if self.projector is not None else None
                self._profile = tensor_parallel_profile(self.tp, path, measure, hidden, self.dtype)
            else:
                self._profile = Profile.load(path)
                if self._profile is None:
                    self._profile = measure()
                    self._profile.save(path)
        return self._profile

    def save_plan(self) -> str:
        """Per layer: saved as hidden state (H), K/V (K) or not at all (R)."""
        L = self.num_layers
        if self.method == "hcache":
            return HIDDEN * L
        if self.method == "kv":
            return KV * L
        if self.method == "auto":
            return self.scheduler.save_plan(tuple(t.name for t in self.store.tiers))
        return RECOMPUTE * L

    def bytes_per_token(self, plan: str | None = None) -> int:
        """Bytes stored per token for a plan (default: this instance's)."""
        return self.layout.plan_bytes_per_token(self.save_plan() if plan is None else plan)

    def loaded_bytes_per_token(self, plan: str | None = None) -> int:
        """Bytes a restore of a plan (default: this instance's) moves per token with no layer recomputed: the
        stored ones, less layer 0's hidden state where the restore makes it from the token embedding."""
        plan = self.save_plan() if plan is None else plan
        skipped = self.layout.bytes_per_token(0, plan[0]) if self.restorer.embeds_first(plan, 0) else 0
        return self.layout.plan_bytes_per_token(plan) - skipped

    def digests(self, token_ids, *, after: str | None = None) -> list[str]:
        return self.layout.digests(token_ids, after=after)

    # ------------------------------------------------------------------ generate
    def generate(self, input_ids: torch.Tensor, **kwargs: Any):
        """`model.generate` with the longest stored prefix restored and the new state saved.

        Takes and returns exactly what `model.generate` does (see `generation` for
        the calls that go to the model untouched).
        """
        prompt = input_ids[0].tolist() if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2 else None
        call = inspect_call(self.model, input_ids, kwargs, prompt)  # `prompt`: the host copy digests and saver share
        if call.restorable and (call.batched or (self.method == "recompute" and self.resident is not None
                                                 and not call.speculative)):
            with self._flusher_held():
                return self.batched.generate(input_ids, kwargs, call)  # a prefix per row (hcache_adapter.serving)
        if self.method == "recompute" or not call.restorable:
            if not call.restorable:
                log.debug("hc.generate: nothing restored or saved: %s", call.reason)
            return self.model.generate(input_ids, **kwargs)
        with self._flusher_held():
            return self._generate_one(input_ids, kwargs, call, prompt)

    @contextmanager
    def _flusher_held(self):
        """The store's flusher waits while a call's restores and its first forward issue their work (bounded
        by the store's background_max_hold_s): its Python would otherwise share the interpreter with them."""
        if not self.hold_flusher:
            yield
            return
        with self.store.hold_background() as hold, after_first_forward(self.model, hold.release):
            yield

    def _generate_one(self, input_ids: torch.Tensor, kwargs: dict, call, prompt: list[int] | None):
        """One sequence: restore its prefix, run model.generate over it, save what is new."""
        with torch.no_grad():
            result = self._restore(input_ids, lazy=call.lazy and self._plain_continuation, prompt=prompt,
                                   into_prefill=not call.speculative and self._graph_prefill(call))
        try:
            cache = cache_for_call(call, self.model, result.cache)
            saver = self._saver(result, cache, prefill_rows=call.expand, prefill_only=call.save_after_prefill,
                                limit=input_ids.shape[1] if call.speculative else None, prompt=prompt,
                                compiled=call.static)
            with saver, with_cache(self.model, kwargs, self._cache_kw, cache) as kw, ExitStack() as stack:
                if result.answered is not None:  # auto learns what the user waited for
                    stack.enter_context(after_first_forward(self.model, result.answered))
                if call.speculative and result.tokens:  # its first forward feeds the whole prompt, cached or not
                    stack.enter_context(first_forward(self.model, skip_cached_tokens(self._cache_kw)))
                elif self._graph_prefill(call, result):
                    hidden = [l for l, kind in enumerate(saver.plan) if kind == HIDDEN]
                    stack.enter_context(first_forward(self.model, self.prefill.handler(
                        cache, result.tokens, saver.step, hidden)))
                out = self._generate_after(input_ids, result.tokens, cache, kw)
            if self.resident is not None and call.expand == 1 and not call.speculative:
                admit_generated(self.resident, out, cache, self.num_layers, self.device)  # stays on the GPU
            return out
        finally:
            result.close()

    @property
    def _plain_continuation(self) -> bool:
        """generate() may run its usual prefill of the new tokens over the restored cache (most models; see
        projection/continuation.py for those that must step one token at a time or see only new tokens)."""
        return self.support is None or (self.support.continuation != STEP and not self.support.new_tokens_only)

    def _generate_after(self, input_ids: torch.Tensor, n: int, cache, kw: dict):
        """model.generate over a cache holding the first n tokens, as this model can continue one."""
        if not n or self._plain_continuation:
            return self.model.generate(input_ids, **kw)
        if self.support.continuation == STEP:  # generate() then continues with the last token only
            step_through(self.model.base_model, input_ids, cache, n, input_ids.shape[1] - 1)
            n = input_ids.shape[1] - 1
        # A recurrent-only cache that reports no length (transformers < 5.25) is shown only the tokens after it.
        return generate_on(self.model, input_ids, n if self.support.new_tokens_only else 0, kw)

    def _graph_prefill(self, call, result: RestoreResult | None = None) -> bool:
        """Whether generate()'s first forward may run from the captured prefill: a restored prefix under
        the default cache (calls with masked prompt positions are never restored at all). Without
        `result`: whether it may, should the restore find a prefix."""
        return (self.prefill is not None and self.prefill.enabled and call.lazy and self._plain_continuation
                and (result is None or bool(result.tokens)))

    @torch.no_grad()
    def save(self, input_ids: torch.Tensor) -> int:
        """Store the state of `input_ids` without generating (e.g. a RAG document ahead of time).

        What is already stored is restored first and only the rest is computed.
        Returns the number of tokens whose state is now stored (whole chunks).
        """
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        if self.method == "recompute" or input_ids.shape[0] != 1:
            return 0
        result = self._restore(input_ids, lazy=self._plain_continuation)
        ids = input_ids.to(self.device)
        try:
            with self._saver(result, result.cache) as saver:
                if result.tokens and not self._plain_continuation and self.support.continuation == STEP:
                    step_through(self.model.base_model, ids, result.cache, result.tokens, ids.shape[1])
                else:
                    self.model.base_model(input_ids=ids[:, result.tokens:], use_cache=True,
                                          **generate_positions(self.model, result.tokens, ids.shape[1], self.device),
                                          **{cache_kwarg(self.model.base_model): result.cache})
        finally:
            result.close()
        done = max(result.tokens, result.stored_chunks * self.chunk_tokens)
        return done + (saver.chunks_saved * self.chunk_tokens if saver.enabled else 0)

    def _saver(self, result: RestoreResult, cache, prefill_rows: int = 1, prefill_only: bool = False,
               limit: int | None = None, prompt: list[int] | None = None, compiled: bool = False) -> StateSaver:
        """`compiled`: transformers may compile the call's decode (a static cache): registered hooks then."""
        return StateSaver(self.layout, self.store, self.save_plan(), start=result.tokens, cache=cache,
                          prefix_digest=result.prefix_digest, stored_chunks=result.stored_chunks,
                          decoder_layers=self.decoder_layers, embeddings=self.model.get_input_embeddings(),
                          internal=self.recomputer.internal, prefill_rows=prefill_rows, prefill_only=prefill_only,
                          limit=limit, prompt=prompt, wrap_forward=not compiled)

    # ------------------------------------------------------------------ restore
    @torch.no_grad()
    def restore(self, input_ids: torch.Tensor, *, lazy: bool = False) -> RestoreResult:
        """The K/V of the longest stored prefix of `input_ids` (`result.cache`, `result.tokens`).

        `result.tokens` is the longest stored whole-chunk prefix that leaves at
        least one token to run (0 when nothing is stored). For method "recompute"
        it is the chunk-aligned prefix, prefilled from tokens. For "auto" it is
        also 0 when the plan is to recompute every layer: the caller's prefill of
        all tokens in one pass does that best. Unpacks as ``cache, n``.

        By default every layer is ready on return, and chunks that cannot be read
        cut the prefix short. With `lazy=True` (what `generate` uses) the cache's
        layers are made ready when the model first uses them, the GPU work queued
        on side streams; the length is fixed up front and a layer that cannot be
        read is recomputed from tokens. `result.close()` ends a lazy restore early.
        """
        return self._restore(input_ids, lazy=lazy)

    def _restore(self, input_ids: torch.Tensor, *, lazy: bool, prompt: list[int] | None = None,
                 into_prefill: bool = False) -> RestoreResult:
        """`into_prefill`: the captured prefill will run on the result, so the restore may write straight
        into its static cache."""
        t0 = time.perf_counter()
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        if input_ids.shape[0] != 1:
            raise ValueError("restore handles one sequence (batch size 1)")
        ids = input_ids.to(self.device)
        C, L = self.chunk_tokens, self.num_layers
        max_chunks = self.layout.whole_chunks(ids.shape[1])
        if self.resident is not None and max_chunks:  # a context still on the GPU: nothing to restore
            hit = self.resident.restore(prompt if prompt is not None else ids[0].tolist(), lazy=lazy)
            if hit is not None:
                return self._done(hit)
        if self.method == "recompute":
            n = max_chunks * C
            cache = self.recomputer.prefix(ids[:, :n], L) if n else new_cache(self.model)
            return self._done(RestoreResult(cache, n, RECOMPUTE * L, L, seconds=time.perf_counter() - t0))
        digests = self.layout.digests(prompt[: max_chunks * C] if prompt is not None else ids[0, : max_chunks * C])
        plan, m = stored_prefix(self.store, self.layout, digests, self.manifests)
        if self.tp:  # every rank restores the same prefix (each looked in its own store)
            plan, m = self.tp.agree_prefix(plan, m, L)
        if m == 0:
            return self._done(RestoreResult(new_cache(self.model), seconds=time.perf_counter() - t0))
        digests = digests[:m]
        # the first layers' reads start now, while the rest is located (None under TP, and for short restores);
        # restorer.restore takes them over
        early = self.restorer.begin(digests, plan, min_recompute(plan))
        try:
            return self._restore_prefix(ids, digests, plan, lazy=lazy, into_prefill=into_prefill, early=early, t0=t0)
        finally:
            if early is not None:
                early.cancel()  # unless the restore took it over

    def _restore_prefix(self, ids: torch.Tensor, digests: list[str], plan: str, *, lazy: bool, into_prefill: bool,
                        early, t0: float) -> RestoreResult:
        """The restore of the stored chunks `digests` (saved with `plan`): locate, split, restore."""
        C, L, m = self.chunk_tokens, self.num_layers, len(digests)
        captured = lazy and self.prefill is not None and self.prefill.enabled
        suffix = ids.shape[1] - m * C
        guess = self.splits.guess(plan, digests, suffix=suffix, captured=captured) if self.splits and not self.tp else None
        if guess is not None and guess.recompute_layers == L:  # what auto learned of NVMe says recompute
            decision, sources = guess, {"nvme": self.splits.on_disk(plan, m)}
        else:
            where, sources = locate_layers(self.store, self.layout, plan, digests)
            # a chunk without every layer ends the prefix (under TP each rank holds only its share: the
            # exchange finds what the group lacks, and all ranks cut at the same chunk)
            complete = m if self.tp else complete_chunks(where)
            whole = complete == m  # the guess, if any, was made for these chunks
            if not whole:
                self.manifests.discard(self.layout.manifest_key(d) for d in digests[complete:])  # maybe saved anew
                m, digests = complete, digests[:complete]
                if m == 0:
                    return self._done(RestoreResult(new_cache(self.model), seconds=time.perf_counter() - t0))
                where, sources = locate_layers(self.store, self.layout, plan, digests)
                suffix = ids.shape[1] - m * C
            decision = (guess if guess is not None and whole and set(sources) == {"nvme"}
                        else self._split(plan, m, sources, suffix=suffix, captured=captured))
        r = decision.recompute_layers if not self.tp else self.tp.agree_rank0(decision.recompute_layers)
        timing = self.splits.timing(decision, m, sources) if self.splits else None  # what auto learns from
        answered = timing.answered if timing is not None else None
        if self.method == "auto" and r == L:
            # Recomputing every layer is a prefill: leave it to the caller's own forward, which then runs
            # the prefix and the new tokens in one pass. The stored chunks are not saved again.
            return self._done(RestoreResult(new_cache(self.model), 0, plan, L, sources, stored_chunks=m,
                                            seconds=time.perf_counter() - t0, answered=answered))
        into = self.prefill.destination(m * C, suffix) if into_prefill and lazy else None
        cache, valid, release = self.restorer.restore(ids, digests, plan, r, lazy=lazy, where=where, marks=timing,
                                                      into=into, early=early)
        if into is not None:
            into.lend(cache)
        if valid < m:
            log.warning("restore: chunk %d of the prefix is missing or corrupt; recomputing from there", valid)
        if valid == 0:
            cache = new_cache(self.model)
        return self._done(RestoreResult(cache, valid * C, plan, r if valid else 0, sources, digests[:valid],
                                        stored_chunks=m, seconds=time.perf_counter() - t0, release=release,
                                        answered=answered))

    def _split(self, plan: str, m: int, sources: dict[str, int], *, suffix: int, captured: bool) -> SplitDecision:
        if self.splits is not None:
            return self.splits.decide(plan, m, sources, suffix=suffix, captured=captured)
        return SplitDecision(min_recompute(plan))

    def _one_time_costs(self) -> int:
        """CUDA graphs this instance captured so far (the first forward's and the projections') and restore
        buffers it allocated: a request that added to them paid a cost the next one will not."""
        return ((self.prefill.captures if self.prefill is not None else 0) + getattr(self.projector, "graph_captures", 0)
                + self.restorer.ring.allocations)

    # -- what the serving parts are handed (hcache_adapter.serving) ---------------------
    def _stored_chunks(self, digests: list[str]) -> int:
        return stored_prefix(self.store, self.layout, digests, self.manifests)[1]

    def _restore_row(self, ids: torch.Tensor, tokens: list[int]) -> RestoreResult:
        return self._restore(ids, lazy=self._plain_continuation, prompt=tokens)

    def _row_saver(self, result: RestoreResult, cache, tokens: list[int]) -> StateSaver:
        return self._saver(result, cache, prompt=tokens)

    def _done(self, result: RestoreResult) -> RestoreResult:
        # What happened, without the cache: holding it would keep its memory (and the captured prefill's
        # graph memory it may point at) alive until the next request.
        self.last_restore = dataclasses.replace(result, cache=None, release=None, answered=None)
        self.stats.count_restore(result.tokens, result.recompute_layers >= self.num_layers,
                                 GPU_SOURCE in result.sources)
        return result


def _find_decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers of a model without a projector: its ModuleList of num_hidden_layers blocks."""
    n = getattr(model.config, "num_hidden_layers", None)
    for module in model.base_model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return list(module)
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")
