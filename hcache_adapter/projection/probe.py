"""One real prefill, watched: which modules are the decoder layers, what each gets and writes.

`run_probe` runs the base model's own forward on a few tokens with a
`CapturingCache` (in logging mode) and a pre- and post-hook on every block of
every ``nn.ModuleList`` of the model.  The decoder layers are then the list
whose blocks the forward ran in order, each once, on ``[batch, tokens, ...]``
inputs (``[batch, tokens, hidden]``, or several streams per token with
hyper-connections), and inside whose calls every cache write happened; each layer's writes
are those made while it ran (a layer may own several cache slots: LongCat's
two attention sublayers per block).  What `support()` decides is built on this.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from hcache_adapter.compat import cache_kwarg

from .calls import accepts, hidden_of_call
from .capture import CapturingCache

PROBE_TOKENS = 8
CONTINUE_TOKENS = 3


@dataclass
class Probe:
    layers: list[nn.Module]  # the decoder layers, in order
    hidden: list[Tensor]  # each one's input hidden state in the prefill
    output_arity: list[int]  # what each returns: 0 a tensor, n a tuple of n
    cache: CapturingCache  # the prefill's cache
    writes: list[list[tuple[int, str]]]  # per decoder layer, (cache slot, method) of each write, in order
    ids: Tensor  # the prefill's PROBE_TOKENS token ids, then CONTINUE_TOKENS more
    vocab: int

    def slots(self, layer: int) -> tuple[int, ...]:
        return tuple(dict.fromkeys(slot for slot, _ in self.writes[layer]))


@dataclass
class _Call:
    block: int
    hidden: Any
    start: int  # writes logged before the call
    end: int = -1  # ... and after it
    arity: int = 0


def run_probe(model: nn.Module, base: nn.Module, n_config_layers: int) -> Probe | str:
    """The probe (module doc), or why it could not run."""
    lists = [m for m in base.modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        return f"{type(base).__name__} has no ModuleList of decoder layers"
    cache = CapturingCache(model.config)
    calls: dict[int, list[_Call]] = {li: [] for li in range(len(lists))}
    handles = []

    def pre(li: int, i: int):
        def hook(module, args, kwargs):
            calls[li].append(_Call(i, hidden_of_call(args, kwargs), len(cache.writes)))
        return hook

    def post(li: int, i: int):
        def hook(module, args, kwargs, output):
            call = calls[li][-1]
            call.end, call.arity = len(cache.writes), (0 if isinstance(output, Tensor) else len(output))
        return hook

    for li, lst in enumerate(lists):
        for i, block in enumerate(lst):
            handles.append(block.register_forward_pre_hook(pre(li, i), with_kwargs=True))
            handles.append(block.register_forward_hook(post(li, i), with_kwargs=True))
    vocab = int(model.config.get_text_config(decoder=True).vocab_size)
    embeddings = model.get_input_embeddings()
    device = getattr(embeddings, "weight", next(model.parameters())).device
    ids = torch.randint(min(3, vocab - 1), vocab, (1, PROBE_TOKENS + CONTINUE_TOKENS),
                        generator=torch.Generator().manual_seed(0)).to(device)
    kwargs = {cache_kwarg(base): cache}
    if accepts(base, "position_ids"):  # as generate() gives them (RoBERTa-style models count differently otherwise)
        kwargs["position_ids"] = torch.arange(PROBE_TOKENS, device=device).unsqueeze(0)
    try:
        with torch.no_grad():
            base(input_ids=ids[:, :PROBE_TOKENS], use_cache=True, **kwargs)
    except Exception as e:
        return f"its forward does not run with a transformers DynamicCache ({type(e).__name__}: {str(e)[:160]})"
    finally:
        for h in handles:
            h.remove()
    chosen = _decoder_list(calls, len(cache.writes), n_config_layers)
    if isinstance(chosen, str):
        return chosen
    mine = calls[chosen]
    writes = [[cache.writes[w] for w in range(c.start, c.end)] for c in mine]
    return Probe(list(lists[chosen][: len(mine)]), [c.hidden for c in mine], [c.arity for c in mine], cache, writes,
                 ids, vocab)


def _decoder_list(calls: dict[int, list[_Call]], n_writes: int, n_config: int) -> int | str:
    """Which list holds the decoder layers (module doc), or why none does."""
    fits, reasons = [], []
    for li, seq in calls.items():
        blocks = [c.block for c in seq]
        if not seq or sorted(set(blocks)) != list(range(len(set(blocks)))):
            continue  # not a stack run from its first block on
        if blocks != list(range(len(set(blocks)))):
            if len(set(blocks)) == n_config or not reasons:
                reasons.append(f"its decoder layers run {len(blocks)} times for {len(set(blocks))} layers per "
                               f"forward (a looped model)")
            continue
        if not all(isinstance(c.hidden, Tensor) and c.hidden.dim() >= 3 and c.hidden.shape[:2] == (1, PROBE_TOKENS)
                   for c in seq):
            if len(seq) == n_config:
                reasons.append("its decoder layers' input is not one [batch, tokens, ...] tensor")
            continue
        covered = sum(c.end - c.start for c in seq)
        if covered == n_writes:
            fits.append((len(seq) == n_config, len(seq), -li, li))
    if fits:
        return max(fits)[-1]
    reasons.sort(key=lambda r: "looped" not in r)
    return reasons[0] if reasons else "no ModuleList whose blocks the forward runs as its decoder layers"
