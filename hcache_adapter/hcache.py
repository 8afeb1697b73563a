"""HCache: wrap a HuggingFace causal LM once; later requests sharing a prefix restore it.

    hc = HCache(model, store, method="hcache")   # "hcache" | "kv" | "recompute" | "auto"
    out = hc.generate(input_ids, max_new_tokens=32)
    cache, n = hc.restore(input_ids)

`generate` restores the longest stored prefix (whole 64-token chunks), runs the
model's own `generate` on top of it while saving every new whole chunk, and
returns exactly what `model.generate` returns. The tail shorter than a chunk is
not stored: it is recomputed with the new tokens of the next request, which
costs at most 63 tokens of prefill and keeps every stored chunk immutable.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from transformers.cache_utils import DynamicLayer

from hcache_adapter.capture import StateSaver
from hcache_adapter.compat import cache_kwarg, fill_layer, new_cache
from hcache_adapter.keys import chunk_digests, layer_key, manifest_key, model_fingerprint
from hcache_adapter.manifest import HIDDEN, KV, RECOMPUTE, Manifest
from hcache_adapter.projection import support
from hcache_adapter.projection.continuation import generate_on, step_through
from hcache_adapter.restore import LayerLoader, LayerRead
from hcache_adapter.scheduler.planner import (
    choose_save_plan,
    effective_bandwidth,
    estimate,
    min_recompute,
    restore_estimate,
)
from hcache_adapter.scheduler.profile import Profile

log = logging.getLogger(__name__)

METHODS = ("hcache", "kv", "recompute", "auto")


class _StopForward(Exception):
    """Raised by a hook to end a forward pass after the layers we want recomputed."""


@dataclass
class RestoreInfo:
    """What the last restore did (for benchmarks and the demo)."""

    tokens: int = 0
    plan: str = ""
    recompute_layers: int = 0
    sources: dict[str, int] = field(default_factory=dict)  # bytes read per tier
    seconds: float = 0.0


class HCache:
    """HCache save / project / restore for one model over one `hstore.TieredStore`.

    method: "hcache" saves every layer's input hidden state and projects it back
    to K/V; "kv" saves K/V (the offload baseline); "recompute" saves nothing and
    prefills from tokens; "auto" saves per layer what the profile says is
    cheapest to restore (or the explicit `plan`, one letter per layer: H, K or
    R) and, at restore time, recomputes as many leading layers as balances I/O
    against compute for the tier the state is actually in.

    On a GPU the projection runs `torch.compile`d (`compile=`) and, for restore
    lengths seen before, as replayed CUDA graphs (`cuda_graphs=`); both default
    to on with CUDA and off elsewhere. The first restore after start-up pays the
    compilation (seconds); the second of a length bucket pays a capture.
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
    ):
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if not isinstance(chunk_tokens, int) or chunk_tokens < 1:
            raise ValueError("chunk_tokens must be a positive int")
        self.model = model
        self.store = store
        self.chunk_tokens = chunk_tokens
        self.namespace = namespace
        self.prefetch_bytes = prefetch_bytes
        if plan is not None and method != "auto":
            raise ValueError("an explicit plan goes with method='auto'")
        self.support = support(model)  # up front: how this model can be served, and why
        if self.support.kind == "refused":
            raise ValueError(f"HCache cannot serve {type(model).__name__}: {self.support.reason}")
        if len(self.support.hidden_shape) > 1:  # StateSaver keeps [1, T, D] rows only
            self.support = dataclasses.replace(self.support, kind="recompute", projector=None, reason=(
                f"its decoder layers take {self.support.hidden_shape} values per token (several streams); "
                "StateSaver stores one row per token"))
        self.projector = self.support.projector
        on_gpu = next(model.parameters()).device.type == "cuda"
        if self.projector is not None and hasattr(self.projector, "compile"):
            # One compiled graph for norm + K/V GEMMs + rotary: worth it on a GPU, not on a CPU.
            self.projector.compile = on_gpu if compile is None else compile
        if self.projector is not None and hasattr(self.projector, "graphs"):
            # Replayed CUDA graphs for repeated restore lengths: the CPU cost of a layer drops ~10x.
            self.projector.graphs = on_gpu if cuda_graphs is None else cuda_graphs
        self.decoder_layers = list(self.support.decoder_layers)
        if not self.decoder_layers and self.support.kind != "recompute":
            self.decoder_layers = _find_decoder_layers(model)
        self.num_layers = len(self.decoder_layers)
        can_kv = self.support.kind in ("hidden", "kv") and all(
            layer.plain_kv or layer.sliding_kv for layer in self.support.layers)  # the saver stops at a full window
        if (method in ("hcache", "auto") and self.projector is None) or (method == "kv" and not can_kv):
            fallback = "kv" if can_kv else "recompute"
            log.warning(
                "HCache cannot serve model_type %r with method %r (%s); it falls back to %r",
                getattr(model.config, "model_type", "?"), method, self.support.reason, fallback,
            )
            method = fallback
        self.method = method
        if plan is not None:
            if len(plan) != self.num_layers or set(plan) - {HIDDEN, KV, RECOMPUTE}:
                raise ValueError(f"plan must be {self.num_layers} letters of H (hidden), K (K/V), R (recompute)")
            if HIDDEN in plan and self.projector is None:
                raise ValueError("this architecture has no projection: a plan cannot use H")
        self._plan = plan
        self.fingerprint = model_id or model_fingerprint(model)
        self._profile = profile
        self._nvme_efficiency = 1.0  # NVMe bandwidth split restores have seen / the profile's
        self._estimate = None  # (estimate, estimate of recomputing everything) of a split NVMe restore
        self._stored_chunks = 0
        self._restored_digests: list[str] = []
        self._cache_kw = cache_kwarg(model)
        self._base_cache_kw = cache_kwarg(model.base_model)
        self.last_restore = RestoreInfo()

    # ------------------------------------------------------------------ properties
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

            path = Path(self.store.config.root) / "profiles" / f"{self.fingerprint}-{self.device.type}.json"
            self._profile = Profile.load(path)
            if self._profile is None:
                self._profile = measure_profile(self)
                self._profile.save(path)
        return self._profile

    def save_plan(self) -> str:
        """Per layer: saved as hidden state (H), K/V (K) or not at all (R)."""
        if self.method == "hcache":
            return HIDDEN * self.num_layers
        if self.method == "kv":
            return KV * self.num_layers
        if self.method == "auto":
            if self._plan:
                return self._plan
            tiers = [t for t in ("gpu", "dram", "nvme") if getattr(self.store, t, None) is not None]
            return choose_save_plan(self.profile, sources=tuple(t for t in tiers if t in self.profile.read_bytes_per_s))
        return RECOMPUTE * self.num_layers

    def bytes_per_token(self, plan: str | None = None) -> int:
        """Bytes stored per token for a plan (default: this instance's)."""
        plan = self.save_plan() if plan is None else plan
        return sum(self._entry_bytes_per_token(l, k) for l, k in enumerate(plan))

    def digests(self, token_ids, *, after: str | None = None) -> list[str]:
        return chunk_digests(self.fingerprint, token_ids, self.chunk_tokens, after=after)

    # ------------------------------------------------------------------ generate
    def generate(self, input_ids: torch.Tensor, **kwargs: Any):
        """`model.generate` with the longest stored prefix restored and the new state saved.

        Takes and returns exactly what `model.generate` does. Batches of more
        than one sequence, beam search and caller-supplied caches go straight to
        `model.generate` (nothing restored or saved).
        """
        if self.method == "recompute" or not self._manageable(input_ids, kwargs):
            return self.model.generate(input_ids, **kwargs)
        cache, n = self.restore(input_ids)
        prefix_digest = self._restored_digests[-1] if n else None
        kwargs[self._cache_kw] = cache
        with StateSaver(self, self.save_plan(), n, cache, prefix_digest, stored_chunks=self._stored_chunks):
            if n and self.support.continuation == "step":  # generate() then continues with the last token only
                step_through(self.model.base_model, input_ids, cache, n, input_ids.shape[1] - 1)
                n = input_ids.shape[1] - 1
            # A recurrent-only cache has no length generate() can read: it is shown only the tokens after it.
            return generate_on(self.model, input_ids, n if self.support.new_tokens_only else 0, kwargs)

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
        cache, n = self.restore(input_ids)
        prefix_digest = self._restored_digests[-1] if n else None
        ids = input_ids.to(self.device)
        stored = self._stored_chunks
        with StateSaver(self, self.save_plan(), n, cache, prefix_digest, stored_chunks=stored) as saver:
            if n and self.support.continuation == "step":
                step_through(self.model.base_model, ids, cache, n, ids.shape[1])
            else:
                self.model.base_model(input_ids=ids[:, n:], use_cache=True, **{self._base_cache_kw: cache})
        return max(n, stored * self.chunk_tokens) + (saver.chunks_saved * self.chunk_tokens if saver.enabled else 0)

    def _manageable(self, input_ids, kwargs) -> bool:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[0] != 1:
            return False
        if kwargs.get("past_key_values") is not None or kwargs.get("cache") is not None:
            return False
        if kwargs.get("inputs_embeds") is not None or kwargs.get("assistant_model") is not None:
            return False
        gc = kwargs.get("generation_config") or self.model.generation_config
        for name in ("num_beams", "num_return_sequences"):
            if (kwargs.get(name) or getattr(gc, name, 1) or 1) > 1:
                return False
        return True

    # ------------------------------------------------------------------ restore
    @torch.no_grad()
    def restore(self, input_ids: torch.Tensor):
        """(cache, n): a transformers Cache holding the K/V of the first n tokens of `input_ids`.

        n is the longest stored whole-chunk prefix that leaves at least one
        token to run (0 when nothing is stored). For method "recompute" it is
        the chunk-aligned prefix, prefilled from tokens. For "auto" it is also 0
        when the plan is to recompute every layer: the caller's prefill of all
        tokens in one pass does that best.
        """
        t0 = time.perf_counter()
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        if input_ids.shape[0] != 1:
            raise ValueError("restore handles one sequence (batch size 1)")
        ids = input_ids.to(self.device)
        max_chunks = (ids.shape[1] - 1) // self.chunk_tokens
        self._restored_digests: list[str] = []
        self._stored_chunks = 0  # chunks stored but left to the caller to recompute (auto)
        cache = new_cache(self.model)
        if self.method == "recompute":
            n = max_chunks * self.chunk_tokens
            if n:
                self._recompute_prefix(ids[:, :n], cache, self.num_layers)
            self.last_restore = RestoreInfo(n, RECOMPUTE * self.num_layers, self.num_layers, {}, time.perf_counter() - t0)
            return cache, n
        digests = self.digests(ids[0, : max_chunks * self.chunk_tokens])
        plan, m = self._stored_prefix(digests)
        if m == 0:
            self.last_restore = RestoreInfo(seconds=time.perf_counter() - t0)
            return cache, 0
        digests = digests[:m]
        n = m * self.chunk_tokens
        r, sources = self._plan_restore(plan, digests, n)
        if self.method == "auto" and r == self.num_layers:
            # Recomputing every layer is a prefill: leave it to the caller's own forward, which then
            # runs the prefix and the new tokens in one pass (one pass is faster than two). The
            # stored chunks stay as they are and are not saved again.
            self._stored_chunks = m
            self.last_restore = RestoreInfo(0, plan, self.num_layers, sources, time.perf_counter() - t0)
            return cache, 0
        t_run = time.perf_counter()
        valid = self._run_restore(ids[:, :n], cache, plan, r, digests)
        if self._estimate is not None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # a split restore's time is known only when its work is done
            self._calibrate(time.perf_counter() - t_run)
        if valid < m and any(type(layer) is not DynamicLayer for layer in cache.layers):
            valid = 0  # only plain K/V layers can be cut to the valid prefix: restore nothing rather than wrong
        if valid < m:
            log.warning("restore: chunk %d of the prefix is missing or corrupt; recomputing from there", valid)
            _truncate(cache, valid * self.chunk_tokens)
        self._restored_digests = digests[:valid]
        n = valid * self.chunk_tokens
        self.last_restore = RestoreInfo(n, plan, r if valid else 0, sources, time.perf_counter() - t0)
        if valid == 0:
            return new_cache(self.model), 0
        return cache, n

    def _stored_prefix(self, digests: list[str]) -> tuple[str, int]:
        """The plan and number of leading chunks that have a valid manifest of one plan."""
        m = 0
        for d in digests:
            if manifest_key(self.namespace, d) not in self.store:
                break
            m += 1
        if m == 0:
            return "", 0
        manifests = [Manifest.decode(t) for t in self.store.get_many([manifest_key(self.namespace, d) for d in digests[:m]])]
        dtype = str(self.dtype).replace("torch.", "")
        plan = None
        for i, man in enumerate(manifests):
            ok = (
                man is not None
                and man.fingerprint == self.fingerprint
                and man.chunk_tokens == self.chunk_tokens
                and man.dtype == dtype
                and len(man.plan) == self.num_layers
                and (plan is None or man.plan == plan)
                and (self.projector is not None or HIDDEN not in man.plan)
            )
            if not ok:
                if man is not None and man.fingerprint != self.fingerprint:
                    log.warning("restore: chunk %d was saved by another model; ignored", i)
                return (plan or "", i)
            plan = man.plan
        return plan, m

    def _plan_restore(self, plan: str, digests: list[str], n: int) -> tuple[int, dict[str, int]]:
        """How many leading layers to recompute, and how many bytes each tier will deliver."""
        keys, sizes = [], []
        for l, kind in enumerate(plan):
            if kind == RECOMPUTE:
                continue
            per_chunk = self._entry_bytes_per_token(l, kind) * self.chunk_tokens
            for d in digests:
                keys.append(layer_key(self.namespace, d, "h" if kind == HIDDEN else "kv", l))
                sizes.append(per_chunk)
        sources: dict[str, int] = {}
        for where, size in zip(self.store.locate(keys), sizes):
            sources[where or "missing"] = sources.get(where or "missing", 0) + size
        r = min_recompute(plan)
        self._estimate = None
        if self.method == "auto":
            known = {s: b for s, b in sources.items() if s in self.profile.read_bytes_per_s}
            tier = max(known, key=known.get) if known else None
            eff = self._nvme_efficiency
            if known.get("nvme") and eff <= 0:  # learned: loading from NVMe loses to recomputation
                return len(plan), sources
            bw = effective_bandwidth(self.profile, known, scale={"nvme": eff})
            depth = self._ring_depth(len(digests), plan)
            est = restore_estimate(self.profile, plan, n, tier or "dram", depth=depth, bytes_per_s=bw)
            r = est.recompute_layers
            if 0 < r < len(plan) and tier == "nvme":
                everything = estimate(self.profile, plan, len(plan), n, bw, depth=depth)
                self._estimate = (est, everything.total_s)
        return r, sources

    def _calibrate(self, seconds: float) -> None:
        """Learn from a restore that mixed recomputation and NVMe reads how fast the reads really were.

        The profile's bandwidth was measured alone; while the compute thread
        recomputes, reads go slower (they share the CPU and the GIL). When a
        split restore takes longer than estimated, NVMe's bandwidth is scaled
        down for later plans; when it took longer than recomputing everything
        would have, loading from NVMe stops; when it is faster, it creeps back
        up. Only NVMe: from memory tiers a restore's time is mostly fixed CPU
        cost, which says nothing about bandwidth.
        """
        if self._estimate is None:
            return
        est, everything_s = self._estimate
        eff = self._nvme_efficiency
        if seconds > everything_s:
            eff = 0.0  # slower than recomputing everything would have been: stop loading from NVMe
        elif seconds > est.total_s * 1.05:
            eff *= est.total_s / seconds
        else:
            eff = min(1.0, eff * 1.05)
        self._nvme_efficiency = eff

    def _ring_depth(self, n_chunks: int, plan: str) -> int:
        """How many layers the loader may read ahead: as many as fit the prefetch budget (at least 2).

        While leading layers are recomputed, the loader can only hide I/O for
        as many layers as it has buffers, so a deep ring is what lets
        recomputation and loading overlap fully.
        """
        budget = self.prefetch_bytes
        if budget is None:
            budget = (2 << 30) if self.device.type == "cuda" else (256 << 20)
        itemsize = torch.empty(0, dtype=self.dtype).element_size()
        slot = max(
            (self._entry_bytes_per_token(l, k) for l, k in enumerate(plan) if k != RECOMPUTE), default=itemsize
        ) * self.chunk_tokens * max(n_chunks, 1)
        return max(2, min(self.num_layers, budget // max(slot, 1)))

    def _run_restore(self, ids: torch.Tensor, cache, plan: str, r: int, digests: list[str]) -> int:
        """Fill `cache` for ids; returns the number of leading chunks valid in every layer."""
        m = len(digests)
        reads = [
            LayerRead(l, kind, [layer_key(self.namespace, d, "h" if kind == HIDDEN else "kv", l) for d in digests],
                      self._chunk_shape(l, kind))
            for l, kind in enumerate(plan) if l >= r
        ]
        loader = LayerLoader(self.store, reads, self.dtype, self.device, depth=self._ring_depth(m, plan)).start()
        valid = m
        try:
            if r:
                loader.prefetch()  # I/O of the loaded layers overlaps the recomputation
                self._recompute_prefix(ids, cache, r)
            positions = torch.arange(ids.shape[1], device=self.device).unsqueeze(0)
            for i, read in enumerate(reads):
                loaded = loader.get(i)
                if loaded.valid_chunks < valid:
                    valid = loaded.valid_chunks
                    positions = positions[:, : valid * self.chunk_tokens]  # one tensor while it holds: rotary reused
                if valid == 0:
                    loader.release(i)
                    break
                rows = valid * self.chunk_tokens
                if read.kind == HIDDEN:
                    hidden = loaded.data[:valid].reshape(1, rows, -1)
                    self.projector.fill_prefix(cache, read.layer, hidden, positions)  # any cache layer kind
                else:
                    kv = loaded.data[:valid]  # [chunks, 2, kv_heads, C, head_dim]
                    k = kv[:, 0].permute(1, 0, 2, 3).reshape(1, kv.shape[2], rows, kv.shape[-1])
                    v = kv[:, 1].permute(1, 0, 2, 3).reshape(1, kv.shape[2], rows, kv.shape[-1])
                    fill_layer(cache, read.layer, k.contiguous(), v.contiguous())
                loader.release(i)
        finally:
            loader.close()
        return valid

    def _recompute_prefix(self, ids: torch.Tensor, cache, layers: int) -> None:
        """Run the model from tokens through its first `layers` decoder layers, filling `cache`."""
        hook = None
        if layers < self.num_layers:
            def stop(module, args, kwargs):
                raise _StopForward

            hook = self.decoder_layers[layers].register_forward_pre_hook(stop, with_kwargs=True)
        try:
            self.model.base_model(input_ids=ids, use_cache=True, **{self._base_cache_kw: cache})
        except _StopForward:
            pass
        finally:
            if hook is not None:
                hook.remove()

    # ------------------------------------------------------------------ shapes
    def _kv_heads_and_dim(self, layer: int) -> tuple[int, int]:
        if self.projector is not None:
            return self.projector.num_kv_heads(layer), self.projector.head_dim(layer)
        cfg = self.model.config
        heads = cfg.num_attention_heads
        kv = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        return kv, head_dim

    def _chunk_shape(self, layer: int, kind: str) -> tuple[int, ...]:
        if kind == HIDDEN:
            return (self.chunk_tokens, self.projector.hidden_size)
        kv, hd = self._kv_heads_and_dim(layer)
        return (2, kv, self.chunk_tokens, hd)

    def _entry_bytes_per_token(self, layer: int, kind: str) -> int:
        if kind == RECOMPUTE:
            return 0
        shape = self._chunk_shape(layer, kind)
        n = 1
        for d in shape:
            n *= d
        return n * torch.empty(0, dtype=self.dtype).element_size() // self.chunk_tokens


def _truncate(cache, n: int) -> None:
    """Keep only the first n positions of every filled layer."""
    for layer in cache.layers:
        if getattr(layer, "is_initialized", False) and getattr(layer, "keys", None) is not None and layer.keys.numel():
            layer.keys = layer.keys[..., :n, :]
            layer.values = layer.values[..., :n, :]


def _find_decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers of a model without a projector: its ModuleList of num_hidden_layers blocks."""
    n = getattr(model.config, "num_hidden_layers", None)
    for module in model.base_model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return list(module)
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")
